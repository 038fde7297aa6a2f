"""The residual video codec (Brenig & Timofte, "Higher fidelity perceptual image and video
compression with a latent conditioned residual denoising diffusion model", video).

A frozen backbone codes the clip; a diffusion refiner (:mod:`diffjax.models.video_refiner`,
the image refiner's UNet) adds perceptual detail at the decoder, conditioned on the
backbone frame and on the previous *refined* frame (the backbone frame for the first), and
predicting the residual in ``steps`` deterministic DDIM steps (default 10, as the poster).
The refiner adds no bits: the file is the backbone's stream plus a few bytes, so the codec
is also the poster's "enhancement method": perceptual enhancement of an ordinary H.265
stream. Backbones (constructor argument ``backbone``):

* ``"x265"`` (default) / ``"x264"``: ffmpeg at ``crf`` (preset medium, 4:2:0, the
  encoders of :class:`diffjax.eval.baselines.FfmpegVideoCoder`, so with ``steps=0`` a file
  decodes to exactly the frames of the x265 / x264 baseline of ``diffjax eval --video``).
  Odd sides are edge-padded to even for 4:2:0 and cropped back. The decoder decodes the
  stream with ffmpeg and checks the MD5 of its decoded pictures against the one the
  encoder stored (H.264/HEVC decoding is bit-exact, and ffmpeg silently conceals damage).
  A model trained on one of them decodes files of either (the backbone is in the file).
* ``"learned"``: the project's gained hyperprior (the residual image codec's base) codes
  every frame intra at rate point ``quality`` (the frames are an
  :class:`~diffjax.codecs.intra.IntraCodec` stream of the folded hyperprior), and the
  refiner is also conditioned on each frame's decoded latent, as in the image codec.

Bitstream (codec id 6, container version 2 with the frame count and rate; the header's
quality byte is the CRF, or the rate point of the learned backbone):

* section 0, the refiner section: ``<B`` backbone (0 x265, 1 x264, 2 learned), ``<B`` CRF
  (0 for the learned backbone), ``<B`` refinement steps, ``16s`` the MD5 of the backbone's
  decoded pictures (zeros for the learned backbone, whose stream has its own checks);
* section 1, the backbone section: the raw Annex-B stream, or the intra container.

The refiner's starting noise of frame ``i`` is drawn with ``fold_in(fold_in(PRNGKey(0),
payload CRC32), i)``: a file always decodes to the same frames on a given platform.

    codec = diffjax.codecs.get("residual-video", crf=30, **model_config)
    data = codec.encode(params, frames, fps=25)        # uint8 [T, H, W, 3] -> bytes
    for frame in codec.decode_frames(params, data):    # refined, frame by frame
        ...
    backbone_only = codec.decode(params, data, steps=0)   # = ffmpeg's decode
"""
from __future__ import annotations

import fractions
import struct
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from diffjax.codecs.base import (VideoCodec, check_frames, crop, fingerprint_pytree,
                                 pad_to_multiple, register)
from diffjax.codecs.residual import check_steps
from diffjax.entropy import bitstream
from diffjax.entropy.bitstream import CorruptError
from diffjax.entropy.latent_coder import IdentityCache
from diffjax.errors import BitstreamError, InputError

DEFAULT_STEPS = 10
DEFAULT_CRF = 30
CRF_RANGE = (18, 42)  # the CRFs the refiner is trained on (DEFAULT_SWEEPS of x265: 20..40)
BACKBONE_IDS = {"x265": 0, "x264": 1, "learned": 2}
_REFINER = struct.Struct("<BBB16s")


def check_crf(crf: Any) -> int:
    """Validate a CRF (0..51, H.264/HEVC's range)."""
    from diffjax.models.video_refiner import MAX_CRF

    if not isinstance(crf, (int, np.integer)) or isinstance(crf, bool) or \
            not 0 <= crf <= MAX_CRF:
        raise InputError(f"crf must be an integer from 0 to {MAX_CRF}, got {crf!r}")
    return int(crf)


@register("residual-video")
class ResidualVideoCodec(VideoCodec):
    """Codec of :class:`~diffjax.models.video_refiner.ResidualVideoModel` (module docstring).

    ``backbone``: ``"x265"``, ``"x264"`` or ``"learned"``; ``crf``: the ffmpeg backbones'
    CRF for new files; ``quality``: the learned backbone's rate point (1..``num_qualities``);
    ``steps``: refinement steps written into new files (0 = the backbone alone); other
    keyword arguments configure the model (``prev_frame``, ``refiner_channels``, ...).
    ``params`` is the model's ``"params"`` collection.
    """

    name = "residual-video"
    codec_id = 6

    def __init__(self, backbone: str = "x265", crf: int = DEFAULT_CRF, quality: int = 1,
                 steps: int = DEFAULT_STEPS, **model_kwargs):
        from diffjax.models.refiner import sample_refined
        from diffjax.models.video_refiner import BACKBONES, ResidualVideoModel

        if backbone not in BACKBONES:
            raise InputError(f"backbone must be one of {', '.join(BACKBONES)}, got {backbone!r}")
        model_kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in model_kwargs.items()}
        try:
            self.model = ResidualVideoModel(backbone=backbone, **model_kwargs)
        except TypeError as err:
            raise InputError(f"residual-video: bad model arguments: {err}") from err
        self.backbone = backbone
        self.crf = check_crf(crf)
        self.steps = check_steps(steps)
        self.learned = backbone == "learned"
        self.qualities = tuple(range(1, self.model.num_qualities + 1)) if self.learned else ()
        if self.learned and (not isinstance(quality, (int, np.integer))
                             or not 1 <= quality <= self.model.num_qualities):
            raise InputError(f"quality must be an integer from 1 to "
                             f"{self.model.num_qualities}, got {quality!r}")
        self.quality = int(quality) if self.learned else 0
        config = {k: v for k, v in self.model.config().items() if k != "backbone"}
        config["backbone"] = "learned" if self.learned else "ffmpeg"  # x265/x264: same net
        self._config = ("residual-video/" + "/".join(f"{k}={v}" for k, v in
                                                     sorted(config.items()))).encode()
        self._cache = IdentityCache()
        if self.learned:
            from diffjax.codecs.hyperprior import HyperpriorCodec
            from diffjax.codecs.intra import IntraCodec

            self.intra = IntraCodec(HyperpriorCodec(N=self.model.N, M=self.model.M,
                                                    mean_scale=True,
                                                    scale_table=self.model.scale_table))
        m, s = self.model, float(self.model.residual_scale)

        def refine(p, x_base_u8, prev_u8, y_cond, q, crf, seed, index, num_steps):
            x_base = x_base_u8.astype(jnp.float32) / 255.0
            prev = prev_u8.astype(jnp.float32) / 255.0

            def denoise(r_t, t):
                tt = jnp.full((r_t.shape[0],), t, jnp.float32)
                return m.apply({"params": p}, r_t, tt, x_base, prev, y_cond, q, crf,
                               method="denoise")

            key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(0), seed), index)
            return sample_refined(denoise, x_base, key, s, num_steps)

        self._refine = jax.jit(refine, static_argnums=(8,))

    # ----------------------------------------------------------------- parameters
    def init(self, rng: jax.Array, size: int = 64) -> dict:
        """Random parameters (the ``"params"`` collection)."""
        import flax.linen as nn

        x = jnp.zeros((1, size, size, 3), jnp.float32)
        init = jax.jit(lambda r: self.model.init({"params": r}, x, jnp.zeros((1,), jnp.int32),
                                                 jnp.zeros((1,), jnp.float32)))
        if isinstance(rng, jax.core.Tracer):  # under eval_shape / jit
            return nn.meta.unbox(init(rng)["params"])
        # A one-off computation: XLA's cheap optimisation level compiles it ~20x faster
        # (the initialisers' truncated normals dominate a default compile).
        init = init.lower(rng).compile(compiler_options={
            "xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True})
        return nn.meta.unbox(init(rng)["params"])

    def _prepared(self, params: Any) -> tuple:
        """``(params, fingerprint, {quality index: folded hyperprior params})``, cached."""
        if isinstance(params, dict) and set(params) == {"params"}:
            params = params["params"]
        return self._cache.get(params, self._prepare)

    def _prepare(self, params: Any) -> tuple:
        from diffjax.models.refiner import fold_quality

        folded = {}
        try:
            if "refiner" not in params:
                raise KeyError("refiner")
            if self.learned:
                folded = {q: fold_quality(params, q) for q in range(self.model.num_qualities)}
        except (KeyError, TypeError, IndexError) as err:
            raise InputError("params are not ResidualVideoModel parameters") from err
        params = jax.tree_util.tree_map(jnp.asarray, params)
        return params, fingerprint_pytree(params, self._config), folded

    def fingerprint(self, params: Any) -> bytes:
        return self._prepared(params)[1]

    # ----------------------------------------------------------------- backbone
    @staticmethod
    def ffmpeg_coder(backbone: str, crf: int, fps: Any = None):
        """The ffmpeg backbone coder (:class:`diffjax.eval.baselines.FfmpegVideoCoder`)."""
        from diffjax.eval.baselines import FfmpegVideoCoder

        rate = fractions.Fraction(25 if fps is None else fps).limit_denominator(1 << 20)
        return FfmpegVideoCoder(backbone, crf, fps=str(rate))

    def encode(self, params: Any, frames: np.ndarray, fps: Any = None) -> bytes:
        """uint8 ``[T, H, W, 3]`` -> bitstream (the codec's backbone, CRF / quality, steps)."""
        frames = check_frames(frames)
        _, fp, folded = self._prepared(params)
        t, h, w = frames.shape[:3]
        fps = 25 if fps is None else fps
        if self.learned:
            stream = self.intra.encode(folded[self.quality - 1], frames, fps=fps)
            refiner = _REFINER.pack(BACKBONE_IDS["learned"], 0, self.steps, bytes(16))
            quality = self.quality
        else:
            coder = self.ffmpeg_coder(self.backbone, self.crf, fps)
            stream = coder.encode(pad_to_multiple(frames, 2))
            refiner = _REFINER.pack(BACKBONE_IDS[self.backbone], self.crf, self.steps,
                                    coder.digest(stream))
            quality = self.crf
        return bitstream.pack(self.codec_id, fp, [refiner, stream], height=h, width=w,
                              frames=t, quality=quality, fps=fps)

    def split(self, params: Any, data: bytes) -> dict:
        """Verify the container and the refiner section: ``{"header", "backbone" (name),
        "crf", "steps", "digest", "stream"}`` (the backbone section's bytes)."""
        _, fp, _ = self._prepared(params)
        header, sections = bitstream.unpack(data, codec_id=self.codec_id, fingerprint=fp)
        if len(sections) != 2 or len(sections[0]) != _REFINER.size or header.channels != 3 \
                or not sections[1]:
            raise CorruptError("residual-video bitstream has the wrong section layout")
        kind, crf, steps, digest = _REFINER.unpack(sections[0])
        names = {v: k for k, v in BACKBONE_IDS.items()}
        if kind not in names or (names[kind] == "learned") != self.learned:
            raise CorruptError(f"residual-video refiner section names backbone {kind}, this "
                               f"model's backbone is {'learned' if self.learned else 'ffmpeg'}")
        if self.learned:
            consistent = not crf and digest == bytes(16) and \
                1 <= header.quality <= self.model.num_qualities
        else:
            consistent = crf <= 51 and header.quality == crf
        if steps > 100 or not consistent:
            raise CorruptError("residual-video refiner section is inconsistent with the header")
        return {"header": header, "backbone": names[kind], "crf": crf, "steps": steps,
                "digest": digest, "stream": sections[1]}

    def backbone_frames(self, params: Any, data: bytes) -> np.ndarray:
        """The ffmpeg backbone's decoded frames uint8 ``[T, H, W, 3]`` (what the refiner
        sees; ``steps=0`` returns exactly these), verified against the stored MD5."""
        parts = self.split(params, data)
        if self.learned:
            raise InputError("backbone_frames is for the ffmpeg backbones")
        return self._ffmpeg_frames(parts)

    def _ffmpeg_frames(self, parts: dict) -> np.ndarray:
        header = parts["header"]
        coder = self.ffmpeg_coder(parts["backbone"], parts["crf"])
        try:
            frames = coder.decode(parts["stream"])
            digest = coder.digest(parts["stream"])
        except BitstreamError as err:
            raise CorruptError(f"residual-video backbone section: {err}") from err
        even = (header.frames, header.height + header.height % 2,
                header.width + header.width % 2, 3)
        if frames.shape != even:
            raise CorruptError(f"residual-video backbone section decodes to {frames.shape}, "
                               f"the header says {even}")
        if digest != parts["digest"]:
            raise CorruptError("residual-video backbone section does not decode to the "
                               "pictures it was coded with (MD5 mismatch)")
        return crop(frames, header.height, header.width)

    # ----------------------------------------------------------------- decoding
    def decode_frames(self, params: Any, data: bytes, steps: int | None = None
                      ) -> Iterator[np.ndarray]:
        """Frames one by one: refined with ``steps`` (``None`` = as the file says, 0 = the
        backbone's decode). The container, the refiner section and the whole backbone
        section (ffmpeg: decode and MD5; learned: the intra index) are checked first."""
        parts = self.split(params, data)
        steps = check_steps(parts["steps"] if steps is None else steps)
        if self.learned:
            _, _, folded = self._prepared(params)
            hp = folded[parts["header"].quality - 1]
            _, frame_sections = self.intra._split(hp, parts["stream"])
            base = self._learned_frames(hp, parts["header"], frame_sections)
        else:
            base = ((f, None) for f in self._ffmpeg_frames(parts))
        return self._refined(params, parts, base, steps)

    def decode(self, params: Any, data: bytes, steps: int | None = None) -> np.ndarray:
        """Bitstream -> uint8 ``[T, H, W, 3]`` (see :meth:`decode_frames`)."""
        return np.stack(list(self.decode_frames(params, data, steps=steps)))

    def _learned_frames(self, hp, header, frame_sections):
        fp = self.intra.image_codec.fingerprint(hp)
        for sections in frame_sections:
            inner = bitstream.pack(self.intra.image_codec.codec_id, fp, sections,
                                   height=header.height, width=header.width)
            ((x, y_hat),) = self.intra.image_codec.decode_with_latents(hp, [inner])
            yield x, y_hat

    def _refined(self, params, parts, base, steps):
        header = parts["header"]
        p, _, _ = self._prepared(params)
        q = header.quality - 1 if self.learned else 0
        crf = np.full((1,), parts["crf"], np.float32)
        prev = None
        for i, (x, y_hat) in enumerate(base):
            if not steps:
                yield x
                continue
            x_pad = pad_to_multiple(x, self.model.multiple)[None]
            y_cond = None
            if self.learned:
                y_cond = y_hat * np.asarray(p["inv_gain"])[q]
            prev = x_pad if prev is None else prev
            out = self._refine(p, x_pad, prev, y_cond, np.full((1,), q, np.int32), crf,
                               np.uint32(header.payload_crc), np.uint32(i), steps)
            prev = np.asarray(out)
            yield crop(prev[0], header.height, header.width)
