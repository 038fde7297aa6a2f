"""Cached first-stage latents: images and video frames encoded once by a frozen autoencoder.

Latent diffusion models (Rombach et al., "High-Resolution Image Synthesis with Latent
Diffusion Models", CVPR 2022) train the denoiser on ``y = E(x)`` of a *frozen* autoencoder,
so ``E`` can run once per training image instead of once per step. On a 2-core CPU the
TAEF2 encoder costs about a third of a small latent UNet's training step at 128 px; this
module removes it (and the JPEG / video decoding) from the step.

A cache folder holds

* ``latents.npy``: float16, all latents flattened one after another;
* ``index.json``: ``{"version", "spec", "encoder_sha256", "channels", "items": [{"name",
  "shape": [h, w], "offset", "offset_flipped"}]}``. Every item is stored twice: the
  latent of the image and the latent of its mirror image, each computed by the encoder
  (a mirrored latent is not the latent of the mirrored image), so a horizontal flip stays
  an exact augmentation.

What goes in (:class:`CacheSpec`): every image under the ``images`` folders and
``frames_per_clip`` evenly spaced frames of each file in ``videos`` (anything PyAV reads,
raw H.264 ``.264`` included, and raw ``*_WxH_*.yuv``); anything larger is downscaled
(area filter) so its longer side is at most ``max_side``, then cropped to a multiple of the
autoencoder's factor. Latents are ``(E(x) - shift_factor) * scaling_factor``, exactly
:meth:`diffjax.codecs.foundation.Backbone.encode` (tested against it).

Training reads random latent crops (``data.kind = "latents"`` in a config, see
:func:`latent_dataset`); :func:`ensure_cache` builds the cache when it is missing or was
built from another spec or encoder, and is the command to run before a job whose time is
counted (``python -m diffjax.input.latent_cache CONFIG[:ARG]``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import sys
from typing import Any, Iterator, Mapping, Sequence

import grain
import numpy as np

from diffjax.errors import InputError
from diffjax.input import sources

CACHE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class CacheSpec:
    """What a latent cache is built from (recorded in its ``index.json``)."""

    images: tuple[str, ...] = ()
    videos: tuple[str, ...] = ()
    frames_per_clip: int = 24
    max_side: int = 640
    images_per_folder: int = 0   # > 0: only the first (natural order) images of each folder
    encoder: str = ""            # TAESD-family encoder .pth; "" = random encoder (tests)
    vae_config: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "CacheSpec":
        cfg = dict(cfg)
        unknown = set(cfg) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise InputError(f"latent_cache: unknown field(s) {sorted(unknown)}")
        spec = cls(images=tuple(str(p) for p in cfg.get("images", ())),
                   videos=tuple(str(p) for p in cfg.get("videos", ())),
                   frames_per_clip=int(cfg.get("frames_per_clip", 24)),
                   max_side=int(cfg.get("max_side", 640)),
                   images_per_folder=int(cfg.get("images_per_folder", 0)),
                   encoder=str(cfg.get("encoder") or ""),
                   vae_config=dict(cfg.get("vae_config") or {}))
        if not spec.images and not spec.videos:
            raise InputError("latent_cache: no images and no videos to encode")
        if spec.frames_per_clip < 1 or spec.max_side < 8:
            raise InputError("latent_cache: frames_per_clip must be >= 1 and max_side >= 8")
        if "latent_channels" not in spec.vae_config:
            raise InputError("latent_cache: vae_config needs latent_channels (and arch_variant, "
                             "scaling_factor, shift_factor)")
        return spec

    def to_json(self) -> dict:
        return {"images": list(self.images), "videos": list(self.videos),
                "frames_per_clip": self.frames_per_clip, "max_side": self.max_side,
                "images_per_folder": self.images_per_folder,
                "encoder": self.encoder, "vae_config": dict(self.vae_config)}


def _sha256(path: str) -> str:
    if not path:
        return "random-encoder-seed-0"
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------- inputs


def _fit(image: np.ndarray, max_side: int, factor: int) -> np.ndarray:
    """Downscale (area) so the longer side is <= ``max_side``; crop to a multiple of ``factor``."""
    h, w = image.shape[:2]
    if max(h, w) > max_side:
        import cv2

        s = max_side / max(h, w)
        image = cv2.resize(image, (max(factor, round(w * s)), max(factor, round(h * s))),
                           interpolation=cv2.INTER_AREA)
        h, w = image.shape[:2]
    hh, ww = h // factor * factor, w // factor * factor
    if hh == 0 or ww == 0:
        raise InputError(f"an input of {h}x{w} is smaller than the autoencoder factor {factor}")
    top, left = (h - hh) // 2, (w - ww) // 2
    return np.ascontiguousarray(image[top:top + hh, left:left + ww])


def clip_frame_indexes(num_frames: int, per_clip: int) -> list[int]:
    """``per_clip`` evenly spaced frame indexes of a clip (all frames when it is shorter)."""
    if num_frames <= per_clip:
        return list(range(num_frames))
    return sorted({int(round(i * (num_frames - 1) / (per_clip - 1))) if per_clip > 1 else 0
                   for i in range(per_clip)})


def _video_frames(path: pathlib.Path, per_clip: int) -> Iterator[tuple[int, np.ndarray]]:
    """``(index, uint8 [H, W, 3])`` of the selected frames of one video file, one pass."""
    src = sources.VideoFileSource([path])
    wanted = clip_frame_indexes(src.num_frames(0), per_clip)
    if path.suffix.lower() == ".yuv":
        for i in wanted:
            yield i, src.read_clip(0, i, 1)[0]
        return
    import av

    keep = set(wanted)
    try:
        with av.open(str(path)) as container:
            for i, frame in enumerate(container.decode(video=0)):
                if i in keep:
                    yield i, frame.to_ndarray(format="rgb24")
                if i >= wanted[-1]:
                    return
    except av.error.FFmpegError as err:
        raise InputError(f"cannot decode video {str(path)!r}: {err}") from err


def iter_inputs(spec: CacheSpec, factor: int = 8) -> Iterator[tuple[str, np.ndarray]]:
    """``(name, uint8 [H, W, 3])`` of everything the cache holds, in a fixed order."""
    for folder in spec.images:
        files = sources.list_files(folder, sources.IMAGE_EXTENSIONS)
        for f in files[:spec.images_per_folder or None]:
            yield (f"{pathlib.Path(folder).name}/{f.name}",
                   _fit(sources.load_image(f), spec.max_side, factor))
    for video in spec.videos:
        path = pathlib.Path(video)
        if not path.is_file():
            raise InputError(f"video {video!r} does not exist")
        for i, frame in _video_frames(path, spec.frames_per_clip):
            yield f"{path.name}#{i}", _fit(frame, spec.max_side, factor)


# ----------------------------------------------------------------------------- building


def make_encoder(spec: CacheSpec):
    """``(encode(images [B, H, W, 3] float [0, 1]) -> latents [B, h, w, C] float32, factor)``:
    the frozen TAESD-family encoder of ``spec`` with the latent scaling, jitted per shape."""
    import jax
    import jax.numpy as jnp

    from diffjax.models.taesd import TAESDEncoder, load_taesd

    vc = dict(spec.vae_config)
    module = TAESDEncoder(latent_channels=int(vc["latent_channels"]),
                          arch_variant=vc.get("arch_variant"))
    if spec.encoder:
        loaded, params = load_taesd(spec.encoder, kind="encoder")
        if (loaded.latent_channels, loaded.arch_variant) != (module.latent_channels,
                                                             module.arch_variant):
            raise InputError(f"{spec.encoder} is a {loaded.latent_channels}-channel "
                             f"{loaded.arch_variant!r} encoder; vae_config asks for "
                             f"{module.latent_channels} channels, {module.arch_variant!r}")
    else:  # the random encoder of LatentDenoiserTask without weights (tests)
        import flax.linen as nn

        from diffjax.nn.layers import host_random_params

        s = module.factor
        shapes = nn.unbox(jax.eval_shape(lambda: module.init(
            jax.random.key(0), jnp.zeros((1, s, s, 3)))["params"]))
        params = host_random_params(shapes, 0)
    params = jax.tree.map(jnp.asarray, params)
    shift = float(vc.get("shift_factor", 0.0))
    scale = float(vc.get("scaling_factor", 1.0))

    @jax.jit
    def encode(x):
        raw = module.apply({"params": params}, x).astype(jnp.float32)
        return (raw - shift) * scale

    return encode, module.factor


def build_cache(spec: CacheSpec, out: str | os.PathLike, *, batch_size: int = 8,
                progress: bool = True) -> pathlib.Path:
    """Encode every input of ``spec`` (and its mirror image) into the cache folder ``out``."""
    from tqdm.auto import tqdm

    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    encode, factor = make_encoder(spec)
    channels = int(spec.vae_config["latent_channels"])
    items, chunks, offset = [], [], 0
    pending: dict[tuple, list] = {}

    def flush(shape):
        nonlocal offset
        group = pending.pop(shape)
        x = np.zeros((batch_size,) + shape, np.float32)  # one compilation per image shape
        x[:len(group)] = np.stack([img for _, img in group]).astype(np.float32) / 255.0
        lat = np.asarray(encode(np.concatenate([x, x[:, :, ::-1]])), np.float32)
        both = np.concatenate([lat[:len(group)], lat[batch_size:batch_size + len(group)]])
        for j, (name, _) in enumerate(group):
            for lat in (both[j], both[len(group) + j]):
                chunks.append(lat.astype(np.float16).reshape(-1))
            n = both[j].size
            items.append({"name": name, "shape": list(both.shape[1:3]), "offset": offset,
                          "offset_flipped": offset + n})
            offset += 2 * n

    bar = tqdm(desc="latent cache", unit="img", disable=not progress, dynamic_ncols=True)
    for name, image in iter_inputs(spec, factor):
        pending.setdefault(image.shape, []).append((name, image))
        if len(pending[image.shape]) == batch_size:
            flush(image.shape)
        bar.update(1)
    for shape in list(pending):
        flush(shape)
    bar.close()
    if not items:
        raise InputError("latent_cache: the spec selects no inputs")
    tmp = out / "latents.tmp.npy"
    np.save(tmp, np.concatenate(chunks))
    os.replace(tmp, out / "latents.npy")
    index = {"version": CACHE_VERSION, "spec": spec.to_json(),
             "encoder_sha256": _sha256(spec.encoder), "channels": channels,
             "items": sorted(items, key=lambda it: it["offset"])}
    (out / "index.json").write_text(json.dumps(index, indent=1))
    return out


def cache_matches(spec: CacheSpec, path: str | os.PathLike) -> bool:
    """True when ``path`` holds a complete cache built from ``spec`` and the same encoder."""
    path = pathlib.Path(path)
    try:
        index = json.loads((path / "index.json").read_text())
    except (OSError, ValueError):
        return False
    return (index.get("version") == CACHE_VERSION and (path / "latents.npy").is_file()
            and index.get("spec") == json.loads(json.dumps(spec.to_json()))
            and index.get("encoder_sha256") == _sha256(spec.encoder))


def ensure_cache(spec: CacheSpec, path: str | os.PathLike, progress: bool = True) -> pathlib.Path:
    """The cache at ``path``, built (or rebuilt) first unless it already matches ``spec``."""
    if not cache_matches(spec, path):
        print(f"diffjax: building the latent cache {path} (once)", file=sys.stderr)
        build_cache(spec, path, progress=progress)
    return pathlib.Path(path)


# ----------------------------------------------------------------------------- reading


class LatentCacheSource:
    """Random-access source over a cache folder: record ``i`` is ``{"index": i}``; the
    crop transform reads the latent window it needs from the memory-mapped file.

    ``min_size``: items whose latent is smaller than ``(h, w)`` are left out (latents cannot
    be upscaled to fit a crop as images are), so training never sees padding.
    """

    def __init__(self, path: str | os.PathLike, min_size: tuple[int, int] = (1, 1)):
        self.path = pathlib.Path(path)
        try:
            index = json.loads((self.path / "index.json").read_text())
        except (OSError, ValueError) as err:
            raise InputError(f"{str(self.path)!r} is not a latent cache (index.json): {err}") from err
        if index.get("version") != CACHE_VERSION:
            raise InputError(f"latent cache {str(self.path)!r} has version "
                             f"{index.get('version')}, expected {CACHE_VERSION}; rebuild it")
        self.channels = int(index["channels"])
        self.items = [it for it in index["items"]
                      if it["shape"][0] >= min_size[0] and it["shape"][1] >= min_size[1]]
        self.skipped = len(index["items"]) - len(self.items)
        if not self.items:
            raise InputError(f"no latent in {str(self.path)!r} is at least {min_size}")
        self.data = np.load(self.path / "latents.npy", mmap_mode="r")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return {"index": np.int32(index)}

    def latent(self, index: int, flipped: bool = False) -> np.ndarray:
        """float16 ``[h, w, C]`` (a view of the memory map)."""
        it = self.items[index]
        h, w = it["shape"]
        start = it["offset_flipped" if flipped else "offset"]
        return self.data[start:start + h * w * self.channels].reshape(h, w, self.channels)

    def __repr__(self) -> str:
        return f"LatentCacheSource({str(self.path)!r}, {len(self)} latents)"


@dataclasses.dataclass
class CropFlipLatent(grain.transforms.RandomMap):
    """``{"index": i}`` -> ``{"latent": float32 [h, w, C]}``: a random window of item ``i``,
    of the mirror image's latent with probability 1/2 when ``flip``."""

    source: LatentCacheSource
    height: int
    width: int
    flip: bool = True

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        i = int(element["index"])
        flipped = bool(self.flip and rng.random() < 0.5)
        lat = self.source.latent(i, flipped)
        h, w = lat.shape[:2]
        top = int(rng.integers(0, h - self.height + 1))
        left = int(rng.integers(0, w - self.width + 1))
        return {"latent": np.asarray(lat[top:top + self.height, left:left + self.width],
                                     np.float32)}


def latent_dataset(cfg: Mapping[str, Any], *, global_batch_size: int, seed: int,
                   **shard) -> grain.MapDataset:
    """Batches ``{"latent": float32 [B, crop/f, crop/f, C]}`` from ``config.data`` with
    ``kind = "latents"``: ``path`` (the cache folder), ``crop`` (pixels, a multiple of the
    factor ``f``), ``flip``, ``latent_cache`` (the :class:`CacheSpec` fields; the cache is
    built first when missing or stale)."""
    from diffjax.input.pipeline import batched_dataset

    spec = CacheSpec.from_config(cfg.get("latent_cache") or {})
    path = ensure_cache(spec, cfg["path"])
    crop = cfg["crop"]
    h, w = (crop, crop) if isinstance(crop, int) else (int(crop[0]), int(crop[1]))
    factor = 8
    if h % factor or w % factor:
        raise InputError(f"latent crops need a crop size that is a multiple of {factor}, "
                         f"got {h}x{w}")
    source = LatentCacheSource(path, min_size=(h // factor, w // factor))
    return batched_dataset(source, CropFlipLatent(source, h // factor, w // factor,
                                                  bool(cfg.get("flip", True))),
                           global_batch_size=global_batch_size, seed=seed, **shard)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m diffjax.input.latent_cache experiments/configs/NAME.py[:ARG]``: build
    the cache of a config whose ``data.kind`` is ``"latents"`` (before a timed job)."""
    import argparse
    import importlib.util

    parser = argparse.ArgumentParser(prog="python -m diffjax.input.latent_cache",
                                     description=main.__doc__)
    parser.add_argument("config", help="config file, optionally with :ARG")
    args = parser.parse_args(argv)
    file, _, arg = args.config.partition(":")
    try:
        spec_ = importlib.util.spec_from_file_location("_latent_cache_config", file)
        if spec_ is None or not os.path.isfile(file):
            raise InputError(f"no config file {file!r}")
        mod = importlib.util.module_from_spec(spec_)
        spec_.loader.exec_module(mod)
        data = mod.get_config(arg).data.to_dict()
        if data.get("kind") != "latents":
            raise InputError(f"{args.config}: data.kind is {data.get('kind')!r}, not 'latents'")
        path = ensure_cache(CacheSpec.from_config(data["latent_cache"]), data["path"])
    except InputError as err:
        print(f"latent_cache: error: {err}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
