"""tensorflow-datasets builders for local copies of compression datasets, read by grain.

Compression research evaluates on a handful of datasets that tfds cannot download
(licences, sizes, dead links): Kodak, CLIC, Vimeo-90k septuplets (the training set of
most learned video codecs, Xue et al. 2019), UVG (Mercat et al. 2020) and private
folders. Each builder here reads a local copy from ``manual_dir`` (the ``data/fetch_*.sh``
scripts put the files there on a machine with internet) and writes the prepared dataset
in **array_record** format by default, so that grain reads it through
``builder.as_data_source`` without TensorFlow (:func:`data_source`); ``tfds.load`` /
``as_dataset`` work too (the array_record records are streamed into ``tf.data``).

Registered names (``manual_dir`` layout -> splits; features):

* ``diffjax_kodak``: ``kodim01.png .. kodim24.png`` -> test; image, name.
* ``diffjax_clic/{professional,mobile,all}``: ``{professional,mobile}/{train,valid,test}/
  *.png`` -> train/validation/test (those present); image, name.
* ``diffjax_vimeo90k``: ``[vimeo_septuplet/]sequences/XXXXX/YYYY/im1..7.png`` with
  ``sep_trainlist.txt``/``sep_testlist.txt`` -> train, test; video ``[7, H, W, 3]``, name.
* ``diffjax_uvg/{clips16,clips7,first96_gop12}``: ``NAME_1920x1080_*.yuv`` (8-bit I420) or
  a folder of PNG frames per sequence -> test; video ``[T, H, W, 3]``, name, start_frame.
* ``diffjax_image_folder`` / ``diffjax_video_folder`` (configurable path): any images /
  frame folders and video files; ``train/``, ``val[id[ation]]/``, ``test/`` subfolders
  become splits, else everything is ``train``.

Images are stored as the *source file's bytes* when it already is an 8-bit RGB PNG (so
decoded pixels are exactly the source pixels, and nothing is re-encoded); other images
are decoded to RGB and stored as PNG. Video clips are a ``Sequence`` of PNG images (a
tensor ``[T, H, W, 3]`` in ``tf.data``; ``tfds.features.Video`` is not used because its
constructor needs TensorFlow, which would make reading need TensorFlow too).

Generic folders are configured by path::

    from diffjax.input import tfds_builders as tb
    tb.prepare("diffjax_image_folder", config=tb.ImageFolderConfig(name="bsds",
               path="/data/bsds500"), data_dir="/data/tfds")
    source = tb.data_source("diffjax_image_folder/bsds", split="train", data_dir="/data/tfds")

This module imports ``tensorflow_datasets`` (installed by ``requirements-tfds.txt``);
TensorFlow itself is imported only by ``as_dataset``. Neither ``diffjax`` nor
``diffjax.input`` imports this module.
"""
from __future__ import annotations

import dataclasses
import functools
import io
import os
import pathlib
import re
from typing import Any, Iterator

import numpy as np

from diffjax.errors import InputError
from diffjax.input import sources

try:
    import tensorflow_datasets as tfds
except ImportError as err:  # pragma: no cover - depends on the optional extra
    raise ImportError("diffjax.input.tfds_builders needs the optional tfds extra: "
                      "pip install -r requirements-tfds.txt (tensorflow-cpu, "
                      "tensorflow-datasets)") from err

_PNG_LEVEL = 3  # zlib level for frames we encode ourselves (decoded video, converted images)
_FETCH_HINT = "see data/README.md; on a machine with internet run data/{script}"
_SPLIT_DIRS = {"train": "train", "training": "train", "val": "validation",
               "valid": "validation", "validation": "validation", "test": "test",
               "testing": "test"}


# ----------------------------------------------------------------------------- encoding


def _png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, np.uint8)).save(buf, format="PNG",
                                                                compress_level=_PNG_LEVEL)
    return buf.getvalue()


def _png_header_is_rgb8(path: str | os.PathLike) -> bool:
    """IHDR says 8-bit truecolour without alpha (PIL also reports 16-bit RGB as "RGB")."""
    with open(path, "rb") as f:
        head = f.read(26)
    return len(head) == 26 and head[12:16] == b"IHDR" and head[24] == 8 and head[25] == 2


def encoded_image(path: str | os.PathLike, *, keep_jpeg: bool = False) -> bytes:
    """Bytes to store for an image file: the file itself when it is an 8-bit RGB PNG
    (or, with ``keep_jpeg``, an RGB JPEG, so lossy files are not re-encoded), else the
    image decoded by :func:`~diffjax.input.sources.load_image` and encoded as PNG."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            fmt, rgb = im.format, im.mode == "RGB" and "transparency" not in im.info
    except (OSError, ValueError, SyntaxError) as err:
        raise InputError(f"cannot decode image {str(path)!r}: {err}") from err
    if rgb and ((fmt == "PNG" and _png_header_is_rgb8(path)) or (keep_jpeg and fmt == "JPEG")):
        return pathlib.Path(path).read_bytes()
    return _png_bytes(sources.load_image(path))


# ----------------------------------------------------------------------------- base class


class _LocalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A builder over files in ``manual_dir``; array_record output by default."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First diffjax release."}
    FETCH_SCRIPT = ""  # data/<script> that fetches the files (named in errors)
    HOMEPAGE = ""
    CITATION = ""
    DESCRIPTION = ""

    def __init__(self, *, file_format: str | None = "array_record", **kwargs: Any):
        super().__init__(file_format=file_format, **kwargs)

    def _make_info(self, features: dict) -> "tfds.core.DatasetInfo":
        # Sorted, unshuffled records: record i is the i-th file in natural order on every
        # host (grain shuffles on its own, with its seed).
        return tfds.core.DatasetInfo(
            builder=self, description=self.DESCRIPTION,
            features=tfds.features.FeaturesDict(features), homepage=self.HOMEPAGE,
            citation=self.CITATION, disable_shuffling=True)

    def _root(self, dl_manager) -> pathlib.Path:
        """The folder holding the source files (``config.path`` or ``manual_dir``)."""
        path = getattr(self.builder_config, "path", None)
        if path:
            root = pathlib.Path(path).expanduser()
            if not root.is_dir():
                raise InputError(f"{self.name}: config path {str(root)!r} is not a folder")
            return root
        try:
            return pathlib.Path(os.fspath(dl_manager.manual_dir))
        except AssertionError as err:  # tfds: "Manual directory ... does not exist or is empty"
            given = getattr(dl_manager, "_manual_dir", None)
            hint = _FETCH_HINT.format(script=self.FETCH_SCRIPT) if self.FETCH_SCRIPT else ""
            raise InputError(
                f"{self.name}: manual_dir {str(given)!r} does not exist or is empty. Pass "
                f"download_config=tfds.download.DownloadConfig(manual_dir=...) pointing at "
                f"the local copy. Expected layout: {self.MANUAL_DOWNLOAD_INSTRUCTIONS.strip()}"
                f" ({hint})") from err

    def _generate_examples(self, **kwargs):
        # Required by tfds; these builders return their example generators from
        # _split_generators (one helper call per split) instead.
        raise NotImplementedError

    # tfds.load / as_dataset on array_record: stream the records into tf.data (tfds only
    # implements as_dataset for tfrecord files; as_data_source is the fast path).
    def _as_dataset(self, split, decoders=None, read_config=None, shuffle_files=False):
        if self.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
            return super()._as_dataset(split=split, decoders=decoders,
                                       read_config=read_config, shuffle_files=shuffle_files)
        import tensorflow as tf
        from tensorflow_datasets.core import example_parser

        features = self.info.features
        if isinstance(decoders, tfds.decode.PartialDecoding):
            features = decoders.extract_features(features)
            decoders = decoders.decoders
        raw = self.as_data_source(split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
        seed = getattr(read_config, "shuffle_seed", None)
        epoch = [0]

        def records() -> Iterator[bytes]:
            order = np.arange(len(raw))
            if shuffle_files:
                np.random.default_rng(None if seed is None else [seed, epoch[0]]).shuffle(order)
                epoch[0] += 1
            for i in order:
                yield raw[int(i)]

        parser = example_parser.ExampleParser(features.get_serialized_info())
        ds = tf.data.Dataset.from_generator(records, output_signature=tf.TensorSpec((), tf.string))
        ds = ds.apply(tf.data.experimental.assert_cardinality(len(raw)))
        ds = ds.map(parser.parse_example, num_parallel_calls=tf.data.AUTOTUNE)
        ds = ds.map(functools.partial(features.decode_example, decoders=decoders),
                    num_parallel_calls=tf.data.AUTOTUNE)
        return ds.prefetch(tf.data.AUTOTUNE)


def _image_features() -> dict:
    return {"image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
            "name": tfds.features.Text()}


def _video_features(length: int) -> dict:
    frame = tfds.features.Image(shape=(None, None, 3), encoding_format="png")
    return {"video": tfds.features.Sequence(frame, length=length),
            "name": tfds.features.Text(),
            "start_frame": tfds.features.Tensor(shape=(), dtype=np.int32)}


def _split_folders(root: pathlib.Path) -> dict[str, list[pathlib.Path]]:
    """``{split: [folders]}`` from ``train/``, ``val/``/``valid/``, ``test/`` children."""
    out: dict[str, list[pathlib.Path]] = {}
    for child in sorted(root.iterdir()):
        split = _SPLIT_DIRS.get(child.name.lower())
        if split and child.is_dir():
            out.setdefault(split, []).append(child)
    return out


def _image_examples(folders: list[pathlib.Path], root: pathlib.Path, *, keep_jpeg: bool,
                    pattern: str | None = None):
    files = []
    for folder in folders:
        try:
            files += sources.list_files(folder, sources.IMAGE_EXTENSIONS)
        except InputError:
            continue
    if pattern:
        files = [f for f in files if re.fullmatch(pattern, f.name)]
    if not files:
        raise InputError(f"no images under {', '.join(repr(str(f)) for f in folders)}")
    for f in files:
        rel = f.relative_to(root)
        yield rel.as_posix(), {"image": encoded_image(f, keep_jpeg=keep_jpeg),
                               "name": rel.with_suffix("").as_posix()}


# ----------------------------------------------------------------------------- images


class DiffjaxKodak(_LocalBuilder):
    """Kodak Lossless True Color Image Suite: 24 PNGs, 768x512 (6 portrait). Evaluation
    only (test split), never for training."""

    DESCRIPTION = __doc__
    HOMEPAGE = "https://r0k.us/graphics/kodak/"
    FETCH_SCRIPT = "fetch_kodak.sh"
    MANUAL_DOWNLOAD_INSTRUCTIONS = "kodim01.png .. kodim24.png directly in manual_dir."

    def _info(self):
        return self._make_info(_image_features())

    def _split_generators(self, dl_manager):
        root = self._root(dl_manager)
        return {"test": _image_examples([root], root, keep_jpeg=False,
                                        pattern=r"kodim\d+\.png")}


@dataclasses.dataclass(eq=False)
class ClicConfig(tfds.core.BuilderConfig):
    """CLIC 2020 track: ``subsets`` are subfolders of manual_dir merged into one dataset."""

    subsets: tuple[str, ...] = ("professional",)


class DiffjaxClic(_LocalBuilder):
    """CLIC 2020 (Challenge on Learned Image Compression) professional and mobile images,
    train / valid / test folders of PNGs (2K-resolution photographs)."""

    DESCRIPTION = __doc__
    HOMEPAGE = "https://www.compression.cc/"
    FETCH_SCRIPT = "fetch_clic.sh"
    MANUAL_DOWNLOAD_INSTRUCTIONS = ("professional/{train,valid,test}/*.png and "
                                    "mobile/{train,valid,test}/*.png in manual_dir.")
    BUILDER_CONFIGS = [
        ClicConfig(name="professional", subsets=("professional",),
                   description="CLIC 2020 professional track"),
        ClicConfig(name="mobile", subsets=("mobile",), description="CLIC 2020 mobile track"),
        ClicConfig(name="all", subsets=("professional", "mobile"),
                   description="professional + mobile"),
    ]

    def _info(self):
        return self._make_info(_image_features())

    def _split_generators(self, dl_manager):
        root = self._root(dl_manager)
        splits: dict[str, list[pathlib.Path]] = {}
        for subset in self.builder_config.subsets:
            if not (root / subset).is_dir():
                raise InputError(f"{self.name}: no folder {str(root / subset)!r}; expected "
                                 f"{self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
            for split, folders in _split_folders(root / subset).items():
                splits.setdefault(split, []).extend(folders)
        if not splits:
            raise InputError(f"{self.name}: no train/valid/test folders under "
                             f"{[str(root / s) for s in self.builder_config.subsets]}")
        return {split: _image_examples(folders, root, keep_jpeg=False)
                for split, folders in splits.items()}


@dataclasses.dataclass(eq=False)
class ImageFolderConfig(tfds.core.BuilderConfig):
    """``path``: the image folder (``None``: use ``manual_dir``)."""

    path: str | None = None


class DiffjaxImageFolder(_LocalBuilder):
    """Any folder of images (PNG/JPEG/...). ``train/``, ``val[id[ation]]/`` and ``test/``
    subfolders become splits, otherwise every image is in ``train``. RGB JPEGs are
    stored as they are (not re-encoded); other non-PNG images become PNG."""

    DESCRIPTION = __doc__
    MANUAL_DOWNLOAD_INSTRUCTIONS = "images (any depth), optionally in train/val/test folders."
    BUILDER_CONFIGS = [ImageFolderConfig(name="default", description="images in manual_dir")]

    def _info(self):
        feats = _image_features()
        feats["image"] = tfds.features.Image(shape=(None, None, 3), encoding_format=None)
        return self._make_info(feats)

    def _split_generators(self, dl_manager):
        root = self._root(dl_manager)
        splits = _split_folders(root) or {"train": [root]}
        return {split: _image_examples(folders, root, keep_jpeg=True)
                for split, folders in splits.items()}


# ----------------------------------------------------------------------------- video


def _decoded_frames(src: sources.VideoFileSource, index: int, start: int, stop: int):
    return [_png_bytes(f) for f in src.read_clip(index, start, stop - start)]


def _frame_files(files: list[pathlib.Path], start: int, stop: int):
    return [encoded_image(p) for p in files[start:stop]]


def _clip_examples(folders: list[pathlib.Path], root: pathlib.Path, *, length: int,
                   stride: int, max_frames: int | None, video_extensions: tuple[str, ...]):
    """Clips of ``length`` frames every ``stride`` frames from frame folders (stored as
    the PNG files themselves) and video files (decoded with PyAV, stored as PNG), all
    sequences in natural order of their names."""
    seqs = []  # (name, frame count, clip reader)
    for folder in folders:
        try:
            videos = sources.list_files(folder, video_extensions)
        except InputError:
            videos = []
        for path in videos:
            if "10bit" in path.name.lower():
                raise InputError(f"{str(path)!r}: only 8-bit YUV 4:2:0 is supported")
        if videos:
            src = sources.VideoFileSource(videos, min_frames=1)
            for i, path in enumerate(src.paths):
                read = functools.partial(_decoded_frames, src, i)
                seqs.append((path.relative_to(root).with_suffix("").as_posix(),
                             src.num_frames(i), read))
        try:
            frame_seqs = sources.FrameFolderSource(folder, min_frames=1).sequences
        except InputError:
            frame_seqs = []
        for seq in frame_seqs:
            read = functools.partial(_frame_files, seq)
            seqs.append((seq[0].parent.relative_to(root).as_posix(), len(seq), read))
    seqs.sort(key=lambda s: sources._natural_key(pathlib.Path(s[0])))
    found = False
    for name, count, read in seqs:
        count = min(count, max_frames) if max_frames else count
        for start in range(0, count - length + 1, stride):
            found = True
            yield f"{name}/{start:06d}", {"video": read(start, start + length), "name": name,
                                          "start_frame": start}
    if not found:
        raise InputError(f"no video or frame folder with at least {length} frames under "
                         f"{', '.join(repr(str(f)) for f in folders)}")


class DiffjaxVimeo90k(_LocalBuilder):
    """Vimeo-90k septuplets (Xue et al., "Video Enhancement with Task-Oriented Flow", IJCV
    2019): 91,701 7-frame 448x256 clips, split by ``sep_trainlist.txt`` (64,612) and
    ``sep_testlist.txt`` (7,824)."""

    DESCRIPTION = __doc__
    HOMEPAGE = "http://toflow.csail.mit.edu/"
    FETCH_SCRIPT = "fetch_vimeo90k.sh"
    CITATION = """@article{xue2019video, title={Video Enhancement with Task-Oriented Flow},
  author={Xue, Tianfan and Chen, Baian and Wu, Jiajun and Wei, Donglai and Freeman,
  William T}, journal={IJCV}, volume={127}, number={8}, pages={1106--1125}, year={2019}}"""
    MANUAL_DOWNLOAD_INSTRUCTIONS = ("the extracted vimeo_septuplet.zip: sequences/XXXXX/YYYY/"
                                    "im1.png .. im7.png, sep_trainlist.txt, sep_testlist.txt "
                                    "(in manual_dir or manual_dir/vimeo_septuplet).")
    FRAMES = 7

    def _info(self):
        feats = _video_features(self.FRAMES)
        del feats["start_frame"]
        return self._make_info(feats)

    def _split_generators(self, dl_manager):
        root = self._root(dl_manager)
        if not (root / "sequences").is_dir() and (root / "vimeo_septuplet").is_dir():
            root = root / "vimeo_septuplet"
        if not (root / "sequences").is_dir():
            raise InputError(f"{self.name}: no sequences/ folder under {str(root)!r}; expected "
                             f"{self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
        splits = {}
        for split, listing in (("train", "sep_trainlist.txt"), ("test", "sep_testlist.txt")):
            if (root / listing).is_file():
                ids = [s.strip() for s in (root / listing).read_text().splitlines() if s.strip()]
                splits[split] = self._generate_examples(root=root, ids=ids)
        if not splits:
            raise InputError(f"{self.name}: neither sep_trainlist.txt nor sep_testlist.txt "
                             f"in {str(root)!r}")
        return splits

    def _generate_examples(self, root: pathlib.Path, ids: list[str]):
        for seq_id in ids:
            folder = root / "sequences" / seq_id
            frames = [folder / f"im{i}.png" for i in range(1, self.FRAMES + 1)]
            missing = [str(f) for f in frames if not f.is_file()]
            if missing:
                raise InputError(f"{self.name}: sequence {seq_id} is incomplete, missing "
                                 f"{missing[0]!r}")
            yield seq_id, {"video": [encoded_image(f) for f in frames], "name": seq_id}


@dataclasses.dataclass(eq=False)
class ClipConfig(tfds.core.BuilderConfig):
    """Clips of ``clip_length`` frames every ``stride`` frames (``None``: non-overlapping),
    from at most the first ``max_frames`` frames of each sequence; ``path`` as in
    :class:`ImageFolderConfig` (generic video folders only)."""

    clip_length: int = 16
    stride: int | None = None
    max_frames: int | None = None
    path: str | None = None


class _ClipBuilder(_LocalBuilder, skip_registration=True):
    VIDEO_EXTENSIONS: tuple[str, ...] = sources.VIDEO_EXTENSIONS

    def _info(self):
        return self._make_info(_video_features(self.builder_config.clip_length))

    def _clips(self, folders, root):
        cfg = self.builder_config
        if cfg.clip_length < 1 or (cfg.stride is not None and cfg.stride < 1):
            raise InputError(f"{self.name}: clip_length and stride must be positive")
        return _clip_examples(folders, root, length=cfg.clip_length,
                              stride=cfg.stride or cfg.clip_length, max_frames=cfg.max_frames,
                              video_extensions=self.VIDEO_EXTENSIONS)


class DiffjaxUvg(_ClipBuilder):
    """UVG (Mercat et al., "UVG dataset: 50/120fps 4K sequences for video codec analysis
    and development", MMSys 2020): 1920x1080 8-bit YUV 4:2:0 test sequences (Beauty,
    Bosphorus, HoneyBee, Jockey, ReadySteadyGo, ShakeNDry, YachtRide), cut into clips and
    converted to RGB with the BT.709 matrix (FFmpeg swscale). Test split only."""

    DESCRIPTION = __doc__
    HOMEPAGE = "https://ultravideo.fi/dataset.html"
    FETCH_SCRIPT = "fetch_uvg.sh"
    CITATION = """@inproceedings{mercat2020uvg, title={UVG dataset: 50/120fps 4K sequences
  for video codec analysis and development}, author={Mercat, Alexandre and Viitanen, Marko
  and Vanne, Jarno}, booktitle={ACM MMSys}, pages={297--302}, year={2020}}"""
    MANUAL_DOWNLOAD_INSTRUCTIONS = ("raw 8-bit I420 files named NAME_1920x1080_*.yuv (e.g. "
                                    "Beauty_1920x1080_120fps_420_8bit_YUV.yuv), or one folder "
                                    "of PNG frames per sequence, in manual_dir.")
    VIDEO_EXTENSIONS = (".yuv",)
    BUILDER_CONFIGS = [
        ClipConfig(name="clips16", clip_length=16, description="non-overlapping 16-frame clips"),
        ClipConfig(name="clips7", clip_length=7, description="non-overlapping 7-frame clips"),
        ClipConfig(name="first96_gop12", clip_length=12, max_frames=96,
                   description="the first 96 frames as 8 GOPs of 12 (the DVC/DCVC protocol)"),
    ]

    def _split_generators(self, dl_manager):
        root = self._root(dl_manager)
        return {"test": self._clips([root], root)}


class DiffjaxVideoFolder(_ClipBuilder):
    """Any folder of videos: frame folders (each folder of images is one sequence) and/or
    video files (anything FFmpeg reads, and raw ``*_WxH_*.yuv``), cut into clips.
    ``train/``, ``val[id[ation]]/`` and ``test/`` subfolders become splits."""

    DESCRIPTION = __doc__
    MANUAL_DOWNLOAD_INSTRUCTIONS = ("frame folders and/or video files, optionally in "
                                    "train/val/test folders.")
    BUILDER_CONFIGS = [ClipConfig(name="default", clip_length=7,
                                  description="non-overlapping 7-frame clips from manual_dir")]

    def _split_generators(self, dl_manager):
        root = self._root(dl_manager)
        splits = _split_folders(root) or {"train": [root]}
        return {split: self._clips(folders, root) for split, folders in splits.items()}


# ----------------------------------------------------------------------------- reading


def prepare(name: str, *, manual_dir: str | os.PathLike | None = None,
            data_dir: str | os.PathLike | None = None,
            config: "str | tfds.core.BuilderConfig | None" = None,
            file_format: str = "array_record") -> "tfds.core.DatasetBuilder":
    """Build (once) dataset ``name`` from the files in ``manual_dir`` into ``data_dir``
    (tfds' default, ``~/tensorflow_datasets``, when ``None``); returns the builder."""
    kwargs: dict[str, Any] = {"file_format": file_format}
    if data_dir is not None:
        kwargs["data_dir"] = os.fspath(data_dir)
    if config is not None:
        kwargs["config"] = config
    builder = tfds.builder(name, **kwargs)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=None if manual_dir is None else os.fspath(manual_dir)))
    return builder


class ImageDataSource:
    """grain source over a prepared image split: ``{"image": uint8 [H, W, 3], "index"}``,
    the records of :class:`~diffjax.input.sources.ImageFolderSource`."""

    kind = "image"

    def __init__(self, source, name: str = ""):
        self._source, self.name = source, name

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict:
        image = np.asarray(self._source[int(index)]["image"], dtype=np.uint8)
        return {"image": image, "index": np.int32(index)}

    def __repr__(self) -> str:
        return f"ImageDataSource({self.name!r}, {len(self)} images)"


class VideoDataSource:
    """grain source over a prepared video split, with the interface of
    :class:`~diffjax.input.sources.FrameFolderSource` (``num_frames``, ``read_clip``) so
    :class:`~diffjax.input.transforms.RandomClip` cuts random sub-clips from it."""

    kind = "video"

    def __init__(self, source, length: int, name: str = ""):
        self._source, self.length, self.name = source, int(length), name

    def __len__(self) -> int:
        return len(self._source)

    def num_frames(self, index: int) -> int:
        return self.length

    def read_clip(self, index: int, start: int, length: int) -> np.ndarray:
        """uint8 ``[length, H, W, 3]``: frames ``start .. start+length-1`` of record ``index``."""
        if start < 0 or start + length > self.length:
            raise InputError(f"clip [{start}, {start + length}) outside the {self.length} "
                             f"frames of record {index}")
        frames = self._source[int(index)]["video"]
        return np.stack([np.asarray(f, np.uint8) for f in frames[start:start + length]])

    def __getitem__(self, index: int) -> dict:
        return {"sequence": np.int32(index)}

    def __repr__(self) -> str:
        return f"VideoDataSource({self.name!r}, {len(self)} clips of {self.length} frames)"


def data_source(name: str, *, split: str = "train",
                data_dir: str | os.PathLike | None = None) -> ImageDataSource | VideoDataSource:
    """Random-access grain source over a *prepared* dataset (array_record; no TensorFlow).

    ``name``: a registered name (``"diffjax_kodak"``, ``"diffjax_clic/mobile"``,
    ``"diffjax_image_folder/bsds"``, ...) looked up in ``data_dir``, or the path of a
    prepared dataset version folder. Image datasets give :class:`ImageDataSource`, video
    ones :class:`VideoDataSource`. Nothing is built here: see :func:`prepare`.
    """
    if os.path.isdir(name):
        builder = tfds.builder_from_directory(name)
    else:
        kwargs = {"data_dir": os.fspath(data_dir)} if data_dir is not None else {}
        try:
            builder = tfds.builder(name, **kwargs)
        except (tfds.core.registered.DatasetNotFoundError, ValueError) as err:
            raise InputError(f"tfds dataset {name!r} not found in data_dir "
                             f"{str(data_dir)!r}: {err}") from err
    if not builder.is_prepared():
        raise InputError(f"tfds dataset {name!r} is not prepared in {str(builder.data_dir)!r};"
                         f" build it first with diffjax.input.tfds_builders.prepare("
                         f"{name!r}, manual_dir=...)")
    available = set(builder.info.splits.keys())
    for part in split.split("+"):
        base = part.split("[")[0].strip()
        if base not in available:
            raise InputError(f"tfds dataset {name!r} has no split {base!r}; it has "
                             f"{sorted(available)}")
    try:
        source = builder.as_data_source(split)
    except NotImplementedError as err:
        raise InputError(f"tfds dataset {name!r} in {str(builder.data_dir)!r} is not in "
                         f"array_record format (prepare it with file_format='array_record')"
                         ) from err
    features = builder.info.features
    label = f"{builder.info.full_name}:{split}"
    if "video" in features:
        return VideoDataSource(source, features["video"].shape[0], label)
    if "image" in features:
        return ImageDataSource(source, label)
    raise InputError(f"tfds dataset {name!r} has neither an 'image' nor a 'video' feature")
