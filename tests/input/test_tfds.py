"""tensorflow-datasets builders (``diffjax.input.tfds_builders``) over tiny local copies.

Every builder is prepared from files generated in a temporary folder (a few 16-48 px
PNGs, a Vimeo-90k-like septuplet tree, a raw I420 file named like the UVG sequences) and
from 3 real Kodak images copied from ``../shared/data/kodak``. The prepared array_record
data is read back three ways: :func:`tfds_builders.data_source` (what grain reads; also
in a process where TensorFlow cannot be imported), ``tfds.load`` (``tf.data``) and the
training pipeline (``dataset_from_config(kind="tfds")``). Decoded pixels must equal the
source files' pixels. Nothing is downloaded.
"""
import pathlib
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from diffjax.errors import InputError
from diffjax.input import pipeline, sources
from diffjax.input import tfds_builders as tb

REPO = pathlib.Path(__file__).resolve().parents[2]
KODAK = ["kodim01.png", "kodim04.png", "kodim07.png"]  # kodim04 is portrait


def _rand(shape, seed):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _save(array, path, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kw)
    return path


def _save_rgb16_png(array16, path):
    """A 16-bit RGB PNG (PIL cannot write one; it reads it as 8-bit "RGB")."""
    import struct
    import zlib

    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    h, w, _ = array16.shape
    rows = b"".join(b"\0" + array16[y].astype(">u2").tobytes() for y in range(h))
    path.parent.mkdir(parents=True, exist_ok=True)
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)  # 16 bits, colour type 2 (RGB)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    return path


def _frames(record):
    return np.stack([np.asarray(f) for f in record["video"]])


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds_data")


@pytest.fixture(scope="module")
def kodak(tmp_path_factory, shared_data, data_dir):
    manual = tmp_path_factory.mktemp("kodak_manual")
    for name in KODAK:
        shutil.copy(shared_data / "kodak" / name, manual / name)
    (manual / "README.txt").write_text("not an image: ignored")
    tb.prepare("diffjax_kodak", manual_dir=manual, data_dir=data_dir)
    return manual


@pytest.fixture(scope="module")
def vimeo(tmp_path_factory, data_dir):
    """manual_dir/vimeo_septuplet/{sequences/XXXXX/YYYY/im1..7.png, sep_*list.txt}."""
    manual = tmp_path_factory.mktemp("vimeo_manual")
    root = manual / "vimeo_septuplet"
    ids = ["00001/0001", "00001/0002", "00002/0001"]
    for k, seq in enumerate(ids):
        for i in range(1, 8):
            _save(_rand((16, 24, 3), 100 * k + i), root / "sequences" / seq / f"im{i}.png")
    (root / "sep_trainlist.txt").write_text("00001/0001\n00002/0001\n\n")
    (root / "sep_testlist.txt").write_text("00001/0002\n")
    tb.prepare("diffjax_vimeo90k", manual_dir=manual, data_dir=data_dir)
    return root


def _write_yuv(path, frames, w, h, seed):
    rng = np.random.default_rng(seed)
    data = rng.integers(16, 236, frames * w * h * 3 // 2, dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    data.tofile(path)
    return path


# ----------------------------------------------------------------------------- images


def test_kodak_subset_round_trips_exact_pixels(kodak, data_dir):
    builder = tfds.builder("diffjax_kodak", data_dir=data_dir)
    assert builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD
    assert set(builder.info.splits.keys()) == {"test"}
    assert builder.info.splits["test"].num_examples == len(KODAK)
    source = builder.as_data_source("test")
    for i, name in enumerate(KODAK):  # records keep the natural file order
        record = source[i]
        assert record["name"].decode() == name[:-4]
        want = np.asarray(Image.open(kodak / name).convert("RGB"))
        assert record["image"].dtype == np.uint8 and record["image"].shape == want.shape
        np.testing.assert_array_equal(record["image"], want)
    assert source[1]["image"].shape == (768, 512, 3)  # kodim04: portrait


def test_clic_configs_and_splits(tmp_path):
    manual = tmp_path / "clic"
    gray = _rand((20, 30), 3)
    rgba = _rand((18, 16, 4), 4)
    files = {
        "professional/train/a.png": _rand((16, 20, 3), 1),
        "professional/train/b.png": _rand((32, 24, 3), 2),
        "professional/valid/c.png": gray,  # grayscale PNG -> RGB
        "mobile/train/d.png": rgba,  # RGBA -> RGB
        "mobile/test/e.png": _rand((48, 40, 3), 5),
    }
    for rel, array in files.items():
        _save(array, manual / rel)
    rgb16 = np.random.default_rng(6).integers(0, 65536, (16, 16, 3), dtype=np.uint16)
    _save_rgb16_png(rgb16, manual / "professional/valid/f.png")  # 16-bit: not passed through
    files["professional/valid/f.png"] = None
    out = tmp_path / "out"
    counts = {}
    for config in ("professional", "mobile", "all"):
        builder = tb.prepare("diffjax_clic", config=config, manual_dir=manual, data_dir=out)
        counts[config] = {k: v.num_examples for k, v in builder.info.splits.items()}
    assert counts == {"professional": {"train": 2, "validation": 2},
                      "mobile": {"train": 1, "test": 1},
                      "all": {"train": 3, "validation": 2, "test": 1}}
    src = tfds.builder("diffjax_clic/all", data_dir=out).as_data_source()
    names = {s: [r["name"].decode() for r in src[s]] for s in src}
    assert names["train"] == ["professional/train/a", "professional/train/b", "mobile/train/d"]
    got = {r["name"].decode(): r["image"] for s in src for r in src[s]}
    for rel in files:
        want = sources.load_image(manual / rel)
        assert got[rel[:-4]].shape == want.shape and got[rel[:-4]].dtype == np.uint8
        np.testing.assert_array_equal(got[rel[:-4]], want)
    np.testing.assert_array_equal(got["professional/valid/c"][..., 1], gray)
    np.testing.assert_array_equal(got["professional/valid/f"], (rgb16 >> 8).astype(np.uint8))


def test_image_folder_by_config_path_keeps_jpeg_bytes(tmp_path):
    root = tmp_path / "myimages"
    _save(_rand((24, 32, 3), 1), root / "train" / "x.png")
    jpeg = _save(_rand((24, 32, 3), 2), root / "train" / "y.jpg", quality=80)
    _save(_rand((16, 16, 3), 3), root / "val" / "z.png")
    config = tb.ImageFolderConfig(name="mine", path=str(root))
    builder = tb.prepare("diffjax_image_folder", config=config, data_dir=tmp_path / "out")
    assert {k: v.num_examples for k, v in builder.info.splits.items()} == {
        "train": 2, "validation": 1}
    train = builder.as_data_source("train")
    np.testing.assert_array_equal(train[1]["image"], np.asarray(Image.open(jpeg)))
    # Read back by name: the custom config is found from the prepared files.
    source = tb.data_source("diffjax_image_folder/mine", split="validation",
                            data_dir=tmp_path / "out")
    assert isinstance(source, tb.ImageDataSource) and len(source) == 1
    np.testing.assert_array_equal(source[0]["image"], sources.load_image(root / "val" / "z.png"))

    # Without train/val/test folders everything is "train"; manual_dir is the default path.
    flat = tmp_path / "flat"
    _save(_rand((16, 16, 3), 4), flat / "a" / "b.png")
    builder = tb.prepare("diffjax_image_folder", manual_dir=flat, data_dir=tmp_path / "out2")
    assert list(builder.info.splits.keys()) == ["train"]
    assert builder.as_data_source("train")[0]["name"].decode() == "a/b"


# ----------------------------------------------------------------------------- video


def test_vimeo90k_septuplets(vimeo, data_dir):
    builder = tfds.builder("diffjax_vimeo90k", data_dir=data_dir)
    assert {k: v.num_examples for k, v in builder.info.splits.items()} == {"train": 2, "test": 1}
    assert builder.info.features["video"].shape == (7, None, None, 3)
    train = builder.as_data_source("train")
    assert [r["name"].decode() for r in train] == ["00001/0001", "00002/0001"]
    clip = _frames(train[1])
    assert clip.shape == (7, 16, 24, 3) and clip.dtype == np.uint8
    want = np.stack([np.asarray(Image.open(vimeo / "sequences/00002/0001" / f"im{i}.png"))
                     for i in range(1, 8)])
    np.testing.assert_array_equal(clip, want)  # frames in order im1..im7


def test_vimeo90k_incomplete_sequence_is_reported(tmp_path):
    root = tmp_path / "manual"
    for i in range(1, 7):  # im7 missing
        _save(_rand((16, 16, 3), i), root / "sequences/00001/0001" / f"im{i}.png")
    (root / "sep_trainlist.txt").write_text("00001/0001\n")
    with pytest.raises(InputError, match="00001/0001 is incomplete.*im7.png"):
        tb.prepare("diffjax_vimeo90k", manual_dir=root, data_dir=tmp_path / "out")


def test_uvg_raw_yuv_and_frame_folder_clips(tmp_path):
    manual = tmp_path / "uvg"
    yuv = _write_yuv(manual / "Tiny_32x16_120fps_420_8bit_YUV.yuv", 5, 32, 16, seed=0)
    pngs = [_save(_rand((16, 32, 3), 10 + i), manual / "Other" / f"f{i:03d}.png")
            for i in range(4)]
    config = tb.ClipConfig(name="clips2", clip_length=2)
    builder = tb.prepare("diffjax_uvg", config=config, manual_dir=manual, data_dir=tmp_path / "o")
    assert list(builder.info.splits.keys()) == ["test"]
    assert builder.info.features["video"].shape == (2, None, None, 3)
    records = list(builder.as_data_source("test"))
    # 5 YUV frames -> clips at 0, 2 (the odd last frame is dropped); 4 PNGs -> 0, 2.
    assert [(r["name"].decode(), int(r["start_frame"])) for r in records] == [
        ("Other", 0), ("Other", 2), ("Tiny_32x16_120fps_420_8bit_YUV", 0),
        ("Tiny_32x16_120fps_420_8bit_YUV", 2)]
    rgb = sources.read_yuv420_frames(yuv, 0, 4)  # BT.709, FFmpeg swscale
    np.testing.assert_array_equal(_frames(records[2]), rgb[0:2])
    np.testing.assert_array_equal(_frames(records[3]), rgb[2:4])
    np.testing.assert_array_equal(_frames(records[1]), np.stack([np.asarray(Image.open(p))
                                                                 for p in pngs[2:4]]))
    assert _frames(records[2]).shape == (2, 16, 32, 3)


def test_uvg_default_configs_and_10bit_rejected(tmp_path):
    names = [c.name for c in tb.DiffjaxUvg.BUILDER_CONFIGS]
    assert names[0] == "clips16" and "first96_gop12" in names
    _write_yuv(tmp_path / "m" / "Beauty_32x16_120fps_420_10bit_YUV.yuv", 1, 32, 16, seed=1)
    with pytest.raises(InputError, match="8-bit"):
        tb.prepare("diffjax_uvg", config=tb.ClipConfig(name="c1", clip_length=1),
                   manual_dir=tmp_path / "m", data_dir=tmp_path / "o")


def test_video_folder_splits_overlapping_clips(tmp_path):
    manual = tmp_path / "videos"
    for i in range(5):
        _save(_rand((16, 16, 3), i), manual / "train" / "seqA" / f"im{i + 1}.png")
    _write_yuv(manual / "test" / "clip_16x16.yuv", 3, 16, 16, seed=2)
    config = tb.ClipConfig(name="c3s1", clip_length=3, stride=1)
    builder = tb.prepare("diffjax_video_folder", config=config, manual_dir=manual,
                         data_dir=tmp_path / "out")
    assert {k: v.num_examples for k, v in builder.info.splits.items()} == {"train": 3, "test": 1}
    train = builder.as_data_source("train")
    assert [int(r["start_frame"]) for r in train] == [0, 1, 2]
    want = np.stack([np.asarray(Image.open(manual / "train/seqA" / f"im{i}.png"))
                     for i in (2, 3, 4)])
    np.testing.assert_array_equal(_frames(train[1]), want)


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("name", ["diffjax_kodak", "diffjax_vimeo90k", "diffjax_uvg/clips16"])
def test_missing_or_empty_manual_dir_is_a_clear_error(tmp_path, name):
    (tmp_path / "empty").mkdir()
    for manual in (tmp_path / "does_not_exist", tmp_path / "empty"):
        with pytest.raises(InputError, match=r"manual_dir .* does not exist or is empty.*"
                                             r"Expected layout.*data/fetch_"):
            tb.prepare(name, manual_dir=manual, data_dir=tmp_path / "out")


def test_wrong_layout_errors(tmp_path):
    _save(_rand((16, 16, 3), 0), tmp_path / "clic" / "other" / "x.png")
    with pytest.raises(InputError, match="professional"):
        tb.prepare("diffjax_clic/professional", manual_dir=tmp_path / "clic", data_dir=tmp_path)
    with pytest.raises(InputError, match="no sequences/ folder"):
        tb.prepare("diffjax_vimeo90k", manual_dir=tmp_path / "clic", data_dir=tmp_path)
    with pytest.raises(InputError, match="is not a folder"):
        tb.prepare("diffjax_image_folder",
                   config=tb.ImageFolderConfig(name="gone", path=str(tmp_path / "gone")),
                   data_dir=tmp_path)


def test_data_source_errors(kodak, data_dir, tmp_path):
    with pytest.raises(InputError, match="no split 'train'.*'test'"):
        tb.data_source("diffjax_kodak", split="train", data_dir=data_dir)
    with pytest.raises(InputError, match="not prepared"):
        tb.data_source("diffjax_kodak", split="test", data_dir=tmp_path)
    with pytest.raises(InputError, match="not found"):
        tb.data_source("no_such_dataset_xyz", data_dir=data_dir)


# ----------------------------------------------------------------------------- readers


def test_grain_pipeline_reads_prepared_images_and_video(kodak, vimeo, data_dir):
    cfg = {"kind": "tfds", "name": "diffjax_kodak", "split": "test", "data_dir": str(data_dir),
           "crop": 32}
    ds = pipeline.dataset_from_config(cfg, global_batch_size=2, seed=0, shard_index=0,
                                      shard_count=1)
    batch = ds[0]
    assert batch["image"].shape == (2, 32, 32, 3) and batch["image"].dtype == np.float32
    np.testing.assert_array_equal(ds[3]["image"], pipeline.dataset_from_config(
        cfg, global_batch_size=2, seed=0, shard_index=0, shard_count=1)[3]["image"])

    cfg = {"kind": "tfds", "name": "diffjax_vimeo90k", "split": "train",
           "data_dir": str(data_dir), "crop": 8, "num_frames": 3, "flip": False}
    ds = pipeline.dataset_from_config(cfg, global_batch_size=2, seed=1, shard_index=0,
                                      shard_count=1)
    video = ds[0]["video"]
    assert video.shape == (2, 3, 8, 8, 3) and 0.0 <= video.min() <= video.max() <= 1.0
    source = tb.data_source("diffjax_vimeo90k", split="train", data_dir=data_dir)
    assert isinstance(source, tb.VideoDataSource) and source.num_frames(0) == 7
    clip = source.read_clip(1, 2, 3)
    want = np.stack([np.asarray(Image.open(vimeo / "sequences/00002/0001" / f"im{i}.png"))
                     for i in (3, 4, 5)])
    np.testing.assert_array_equal(clip, want)
    with pytest.raises(InputError, match="outside"):
        source.read_clip(0, 5, 3)


def test_prepared_data_reads_without_tensorflow(kodak, vimeo, data_dir):
    """DESIGN: grain reads prepared array_record data without TF (TF made unimportable)."""
    script = textwrap.dedent(f"""
        import importlib.machinery as m, sys
        _find = m.PathFinder.find_spec
        def find_spec(name, path=None, target=None):
            return None if name.split(".")[0] == "tensorflow" else _find(name, path, target)
        m.PathFinder.find_spec = staticmethod(find_spec)
        import diffjax, diffjax.input
        assert "tensorflow_datasets" not in sys.modules  # diffjax.input does not import it
        from diffjax.input import tfds_builders as tb
        img = tb.data_source("diffjax_kodak", split="test", data_dir={str(data_dir)!r})
        vid = tb.data_source("diffjax_vimeo90k", split="test", data_dir={str(data_dir)!r})
        print(len(img), img[0]["image"].shape, vid.read_clip(0, 0, 7).shape)
        assert not any(k == "tensorflow" or k.startswith("tensorflow.") for k in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "3 (512, 768, 3) (7, 16, 24, 3)" in out.stdout


def test_tfds_load_streams_array_record_into_tf_data(kodak, vimeo, data_dir):
    """``tfds.load`` (tf.data) on the array_record data; in a subprocess, so TensorFlow is
    never loaded into the test process beside torch and JAX."""
    script = textwrap.dedent(f"""
        import numpy as np, tensorflow_datasets as tfds
        from PIL import Image
        import diffjax.input.tfds_builders  # registers the builders
        kodak, data_dir, names = {str(kodak)!r}, {str(data_dir)!r}, {KODAK!r}
        config = tfds.download.DownloadConfig(manual_dir=kodak)
        ds = tfds.load("diffjax_kodak", split="test", data_dir=data_dir,
                       download_and_prepare_kwargs={{"download_config": config}})
        records = list(tfds.as_numpy(ds))
        assert [r["name"].decode() for r in records] == [n[:-4] for n in names]
        want = np.asarray(Image.open(kodak + "/" + names[2]).convert("RGB"))
        np.testing.assert_array_equal(records[2]["image"], want)
        videos = list(tfds.as_numpy(tfds.load("diffjax_vimeo90k", split="train",
                                              data_dir=data_dir, shuffle_files=True,
                                              download=False)))
        assert sorted(v["name"].decode() for v in videos) == ["00001/0001", "00002/0001"]
        assert all(v["video"].shape == (7, 16, 24, 3) and v["video"].dtype == np.uint8
                   for v in videos)
        print("tfds.load ok")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "tfds.load ok" in out.stdout


# ----------------------------------------------------------------------------- scripts


@pytest.mark.parametrize("name", ["kodak", "clic", "vimeo90k", "uvg"])
def test_fetch_scripts_are_executable_and_parse(name):
    script = REPO / "data" / f"fetch_{name}.sh"
    assert script.is_file() and script.stat().st_mode & 0o111, script
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    assert f"fetch_{name}.sh" in (REPO / "data" / "README.md").read_text()
