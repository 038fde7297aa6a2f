"""The residual diffusion codec (Brenig & Timofte), diffjax's default image codec.

"Higher fidelity perceptual image and video compression with a latent conditioned residual
denoising diffusion model": a distortion-optimised learned codec (here the mean-scale
hyperprior with per-quality gain units, :mod:`diffjax.models.refiner`) gives ``x̂_base``; a
diffusion UNet conditioned on the decoded latent predicts the residual ``x − x̂_base`` in a
few deterministic DDIM steps, adding realistic detail.

**Encode** (``quality`` q in 1..Q): fold the gains of q into plain hyperprior parameters
(:func:`~diffjax.models.refiner.fold_quality`) and run the hyperprior codec; its sections
(the z and y streams) come first here, followed by one byte: the number of refinement
steps the sender asks for (0 = base only). Grayscale inputs are coded as RGB (channels = 1
in the header, the decoder returns one channel); RGBA inputs code the colour as above and
the **alpha plane losslessly** (zlib, a last section; channels = 4).

**Decode**: the hyperprior sections are decoded once by the hyperprior codec itself, with
all its checks, into ``x̂_base`` and the refiner's condition ``ŷ``;
with ``steps > 0`` the refiner runs a deterministic DDIM (eta = 0, x0-prediction) from
``r_T ~ N(0, I)`` drawn with ``fold_in(PRNGKey(0), payload CRC32)``: the noise is derived from the file
itself, so a file always decodes to the same image on a given platform, with no seed to
store. The fingerprint covers all parameters (base, gains, refiner) and the configuration.

    codec = diffjax.codecs.get("residual", quality=2, steps=4, **model_config)
    data = codec.encode(params, image)            # uint8 [H, W, 3] -> bytes
    x = codec.decode(params, data)                # refined (steps from the file)
    x_base = codec.decode(params, data, steps=0)  # base only (fast, PSNR-oriented)
"""
from __future__ import annotations

import struct
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffjax.codecs.base import Codec, crop, fingerprint_pytree, pad_to_multiple, register
from diffjax.codecs.hyperprior import HyperpriorCodec
from diffjax.entropy import bitstream
from diffjax.entropy.bitstream import CorruptError
from diffjax.entropy.latent_coder import IdentityCache
from diffjax.errors import InputError

DEFAULT_STEPS = 4
MAX_STEPS = 100
_STEPS = struct.Struct("<B")


def as_channels(image: Any) -> tuple[np.ndarray, np.ndarray | None, int]:
    """Split a uint8 gray ``[H, W]``/``[H, W, 1]``, RGB or RGBA image into
    ``(rgb [H, W, 3], alpha [H, W] or None, channels)``."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise InputError(f"expected a uint8 image, got dtype {image.dtype}")
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4) or min(image.shape[:2]) < 1:
        raise InputError(f"expected a gray, RGB or RGBA image [H, W, 1|3|4], got {image.shape}")
    channels = image.shape[-1]
    if channels == 1:
        return np.repeat(image, 3, axis=-1), None, 1
    if channels == 4:
        return np.ascontiguousarray(image[..., :3]), np.ascontiguousarray(image[..., 3]), 4
    return image, None, 3


@register("residual")
class ResidualCodec(Codec):
    """Codec of :class:`~diffjax.models.refiner.ResidualCodecModel` (see module docstring).

    ``quality``: rate point 1..``num_qualities`` (1 = smallest files); ``steps``: refinement
    steps written into new files (0 = base only); other keyword arguments configure the
    model (``N``, ``M``, ``num_qualities``, ``refiner_channels``, ...). ``params`` is the
    model's ``"params"`` collection.
    """

    name = "residual"
    codec_id = 2

    def __init__(self, quality: int = 1, steps: int = DEFAULT_STEPS, **model_kwargs):
        from diffjax.models.refiner import ResidualCodecModel, sample_refined

        model_kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in model_kwargs.items()}
        self.model = ResidualCodecModel(**model_kwargs)
        q = self.model.num_qualities
        if not isinstance(quality, (int, np.integer)) or not 1 <= quality <= q:
            raise InputError(f"quality must be an integer from 1 to {q}, got {quality!r}")
        self.quality = int(quality)
        self.qualities = tuple(range(1, q + 1))
        self.steps = check_steps(steps)
        self.base = HyperpriorCodec(N=self.model.N, M=self.model.M, mean_scale=True,
                                    scale_table=self.model.scale_table)
        self._config = ("residual/" + "/".join(f"{k}={v}" for k, v in
                                               sorted(self.model.config().items()))).encode()
        self._cache = IdentityCache()
        m = self.model
        s = float(m.residual_scale)

        def refine(p, x_base_u8, y_cond, q, seed, num_steps):
            x_base = x_base_u8.astype(jnp.float32) / 255.0
            qv = jnp.full((x_base.shape[0],), q, jnp.int32)

            def denoise(r_t, t):
                tt = jnp.full((r_t.shape[0],), t, jnp.float32)
                return m.apply({"params": p}, r_t, tt, x_base, y_cond, qv, method="denoise")

            key = jax.random.fold_in(jax.random.PRNGKey(0), seed)  # seed: uint32 CRC
            return sample_refined(denoise, x_base, key, s, num_steps)

        self._refine = jax.jit(refine, static_argnums=(5,))

    # ----------------------------------------------------------------- parameters
    def init(self, rng: jax.Array, size: int = 64) -> dict:
        """Random parameters (the ``"params"`` collection)."""
        import flax.linen as nn

        x = jnp.zeros((1, size, size, 3), jnp.float32)
        init = jax.jit(lambda r: self.model.init({"params": r, "noise": r}, x,
                                                 jnp.zeros((1,), jnp.int32), train=False))
        return nn.meta.unbox(init(rng)["params"])

    def _prepared(self, params: Any) -> tuple:
        """``(params, fingerprint, {quality index: folded hyperprior params})``, cached."""
        if isinstance(params, dict) and set(params) == {"params"}:
            params = params["params"]
        return self._cache.get(params, self._prepare)

    def _prepare(self, params: Any) -> tuple:
        from diffjax.models.refiner import fold_quality

        try:
            folded = {q: fold_quality(params, q) for q in range(self.model.num_qualities)}
        except (KeyError, TypeError, IndexError) as err:
            raise InputError("params are not ResidualCodecModel parameters") from err
        params = jax.tree_util.tree_map(jnp.asarray, params)
        return params, fingerprint_pytree(params, self._config), folded

    def fingerprint(self, params: Any) -> bytes:
        return self._prepared(params)[1]

    # ----------------------------------------------------------------- protocol
    def encode(self, params: Any, image: np.ndarray) -> bytes:
        """uint8 gray/RGB/RGBA ``[H, W, C]`` -> bitstream (quality and steps of the codec)."""
        _, fp, folded = self._prepared(params)
        rgb, alpha, channels = as_channels(image)
        inner = self.base.encode(folded[self.quality - 1], rgb)
        _, sections = bitstream.unpack(inner, codec_id=self.base.codec_id)
        sections = list(sections) + [_STEPS.pack(self.steps)]
        if alpha is not None:
            sections.append(zlib.compress(alpha.tobytes(), 9))
        h, w = rgb.shape[:2]
        return bitstream.pack(self.codec_id, fp, sections, height=h, width=w,
                              channels=channels, quality=self.quality)

    def decode(self, params: Any, data: bytes, steps: int | None = None) -> np.ndarray:
        """Bitstream -> uint8 ``[H, W, C]``. ``steps``: ``None`` = as written in the file,
        0 = base only, ``n`` = ``n`` DDIM refinement steps."""
        p, fp, folded = self._prepared(params)
        header, sections = bitstream.unpack(data, codec_id=self.codec_id, fingerprint=fp)
        n_hp = len(sections) - 1 - (header.channels == 4)
        if (header.frames != 1 or header.channels not in (1, 3, 4) or n_hp < 1
                or len(sections[n_hp]) != _STEPS.size):
            raise CorruptError("residual bitstream has the wrong section layout")
        if not 1 <= header.quality <= self.model.num_qualities:
            raise CorruptError(f"quality {header.quality} outside 1..{self.model.num_qualities}")
        q = header.quality - 1
        (stored_steps,) = _STEPS.unpack(sections[n_hp])
        steps = check_steps(stored_steps if steps is None else steps)
        # The base layer is a complete hyperprior stream: its decoder does every check.
        hp_params = folded[q]
        inner = bitstream.pack(self.base.codec_id, self.base.fingerprint(hp_params),
                               sections[:n_hp], height=header.height, width=header.width)
        ((x, y_hat),) = self.base.decode_with_latents(hp_params, [inner])
        if steps:
            y_cond = y_hat * np.asarray(p["inv_gain"])[q]
            x_pad = pad_to_multiple(x, self.model.multiple)[None]
            x = np.asarray(self._refine(p, x_pad, y_cond, q, np.uint32(header.payload_crc), steps))[0]
        x = crop(x, header.height, header.width)
        if header.channels == 1:
            # Coded as R = G = B; return the luma the decoder reconstructs (BT.601).
            y = x.astype(np.float32) @ np.float32([0.299, 0.587, 0.114])
            return np.clip(np.round(y), 0, 255).astype(np.uint8)[..., None]
        if header.channels == 4:
            try:
                alpha = np.frombuffer(zlib.decompress(sections[-1]), np.uint8)
            except zlib.error as err:
                raise CorruptError(f"alpha plane does not decompress: {err}") from err
            if alpha.size != header.height * header.width:
                raise CorruptError("alpha plane has the wrong size")
            x = np.concatenate([x, alpha.reshape(header.height, header.width, 1)], axis=-1)
        return x

def check_steps(steps: Any) -> int:
    """Validate a number of refinement steps (0 = base only)."""
    if not isinstance(steps, (int, np.integer)) or not 0 <= steps <= MAX_STEPS:
        raise InputError(f"steps must be an integer from 0 to {MAX_STEPS}, got {steps!r}")
    return int(steps)
