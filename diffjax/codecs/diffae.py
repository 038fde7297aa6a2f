"""The diffusion autoencoder image codec (Rampas 2024), with real bitstreams.

Rampas, "On Neural Compression using Diffusion Autoencoders" (2024; the Würstchen /
StableCascade lineage): a small encoder compresses the image 32x spatially, a large
diffusion decoder generates the image back from that latent.

* **Encoder** (sec. 3.2): EfficientNetV2-S ``features`` (Tan & Le 2021;
  :class:`diffjax.models.encoders.EfficientNetV2`, BatchNorm with running statistics at
  inference) -> 1x1 conv to ``latent_channels`` (16) -> BatchNorm *without* affine (as
  StableCascade's ``EfficientNetEncoder``), so the latent is standardised per channel.
* **Rates** (our choice; the thesis counts raw 16-bit floats): one model covers several
  rates by a quantisation step ``Δ_q`` per quality ``q`` (``quant_steps``, coarsest first:
  quality 0 is the lowest rate). Symbols ``round(y / Δ_q - m)`` are range coded with a
  learned factorized prior (:class:`~diffjax.entropy.models.EntropyBottleneck` with one
  density per (quality, channel): ``len(quant_steps) * latent_channels`` rows, ``m`` its
  medians); the decoder sees ``ŷ = (symbols + m) Δ_q`` and ``log2 Δ_q`` as an extra input
  channel, so it knows how coarse its condition is. Training uses uniform noise in place of
  rounding (Ballé et al. 2017) and a quality drawn per example.
* **Decoder** (sec. 3.3): a UNet (:class:`~diffjax.models.unet.UNet2DConditionModel`, the
  shared SD blocks; its sinusoidal timestep features are the Fourier time embedding) in the
  first-stage latent space -- TAEF2 (FLUX.2 tiny autoencoder, /8, 32 channels) in place of
  the thesis's f4 VQGAN, or an SD-compatible ``AutoencoderKL`` (``vae="sd"``). ``ŷ`` is
  nearest-upsampled to the first-stage grid and concatenated to the noisy latent at the
  UNet input (with the ``log2 Δ`` channel).
* **Diffusion** (Table 1): variance-preserving cosine schedule (Nichol & Dhariwal 2021,
  ``squaredcos_cap_v2``), x0-prediction with min-SNR(5) weighting (Hang et al. 2023; the
  thesis's best combination, FID 10.38 vs 10.61 for eps); ``prediction_type`` selects eps
  or v instead (the Table 1 ablation; training: :mod:`diffjax.codecs.diffae_train`). Sampling: DDPM (Ho et al. 2020)
  with ``num_steps`` chosen at decode time (default 10, the low end of the thesis's 10-30),
  ``trailing`` timesteps so that the first step starts from pure noise, and
  classifier-free guidance (Ho & Salimans 2022) against the all-zeros condition, scale
  ``guidance_scale`` (3, the thesis's w), trained with condition dropout
  (``p_uncond``) in :func:`diffae_loss`.
* **Determinism**: the initial noise and every DDPM step's noise derive from a 32-bit seed
  stored in the bitstream, so decoding the same file with the same parameters gives the
  same pixels (same machine and software; checked in a fresh process by the tests).

Bitstream (``diffjax.entropy.bitstream``, codec id 4): header quality = ``q``; sections
``[meta = (seed uint32), latent stream]``; the geometry gives the latent shape.

Params: ``{"encoder": {"params", "batch_stats"}, "entropy": bottleneck params, "unet": ...,
"vae": {"encoder", "decoder"} (TAESD) or AutoencoderKL params}``.
"""
from __future__ import annotations

import copy
import json
import math
import struct
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffjax.codecs.base import (Codec, check_image, crop, fingerprint_pytree, pad_to_multiple,
                                 register)
from diffjax.diffusion.losses import Weighting, denoising_loss
from diffjax.diffusion.parameterization import canonical_prediction_type
from diffjax.diffusion.samplers import make_plan
from diffjax.diffusion.sampling import CFG, run_plan
from diffjax.diffusion.schedules import DiscreteSchedule
from diffjax.entropy import bitstream, coder
from diffjax.entropy.bitstream import CorruptError
from diffjax.entropy.latent_coder import IdentityCache, check_symbols, group_indexes
from diffjax.entropy.models import (EntropyBottleneck, bits, factorized_medians,
                                    factorized_table)
from diffjax.errors import InputError
from diffjax.models.encoders import EfficientNetV2
from diffjax.nn.layers import host_random_params

QUANT_STEPS = (4.0, 2.0, 1.0, 0.5)  # Δ per quality, coarsest (lowest rate) first
SCHEDULER = {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2",
             "prediction_type": "sample", "clip_sample": False, "timestep_spacing": "trailing"}
_META = struct.Struct("<I")  # the noise seed


class DiffAEEncoder(nn.Module):
    """EfficientNetV2 ``features`` + 1x1 projection + affine-free BatchNorm (StableCascade).

    ``[B, H, W, 3]`` in ``[0, 1]`` (ImageNet-normalised inside) -> ``[B, H/32, W/32, C]``.
    """

    latent_channels: int = 16
    width_mult: float = 1.0
    depth_mult: float = 1.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x01, train: bool = False):
        mean = jnp.asarray([0.485, 0.456, 0.406], jnp.float32)
        std = jnp.asarray([0.229, 0.224, 0.225], jnp.float32)
        h = EfficientNetV2.v2_s(self.width_mult, self.depth_mult, dtype=self.dtype,
                                name="backbone")((x01 - mean) / std, train)
        h = nn.Conv(self.latent_channels, (1, 1), use_bias=False, dtype=self.dtype,
                    name="proj")(h)
        return nn.BatchNorm(use_running_average=not train, use_scale=False, use_bias=False,
                            momentum=0.9, epsilon=1e-5, dtype=jnp.float32,
                            use_fast_variance=False, name="proj_norm")(h.astype(jnp.float32))


class FirstStage:
    """The frozen first-stage autoencoder (TAESD family or SD ``AutoencoderKL``); diffusion
    latents are ``(E(x) - shift) * scaling_factor``, as in
    :class:`diffjax.codecs.foundation.Backbone` (whose constructor also builds its UNet)."""

    def __init__(self, vae: str, vae_config: Mapping, dtype=jnp.float32):
        cfg = dict(vae_config)
        self.kind = vae
        if vae == "taesd":
            from diffjax.models.taesd import TAESDDecoder, TAESDEncoder

            kw = dict(latent_channels=int(cfg["latent_channels"]),
                      arch_variant=cfg.get("arch_variant"), dtype=dtype)
            self.modules = (TAESDEncoder(**kw), TAESDDecoder(**kw))
            self.channels, self.factor = kw["latent_channels"], self.modules[0].factor
        elif vae == "sd":
            from diffjax.models.vae import AutoencoderKL

            self.vae = AutoencoderKL.from_config(
                {k: v for k, v in cfg.items() if k not in ("taesd_encoder", "taesd_decoder")},
                dtype=dtype)
            self.channels, self.factor = self.vae.latent_channels, self.vae.downsample_factor
            cfg.setdefault("scaling_factor", self.vae.scaling_factor)
            cfg.setdefault("shift_factor", self.vae.shift_factor or 0.0)
        else:
            raise InputError(f"unknown first-stage autoencoder {vae!r}; expected 'taesd' or 'sd'")
        self.scaling = float(cfg.get("scaling_factor", 1.0))
        self.shift = float(cfg.get("shift_factor", 0.0) or 0.0)
        self.paths = (cfg.get("taesd_encoder"), cfg.get("taesd_decoder"))

    def param_shapes(self):
        key = jax.random.key(0)
        if self.kind == "sd":
            args, kw = self.vae.dummy_inputs()
            return nn.unbox(jax.eval_shape(lambda: self.vae.init(key, *args, **kw)["params"]))
        s = self.factor
        return nn.unbox(jax.eval_shape(lambda: {
            "encoder": self.modules[0].init(key, jnp.zeros((1, s, s, 3)))["params"],
            "decoder": self.modules[1].init(key, jnp.zeros((1, 1, 1, self.channels)))["params"]}))

    def load(self, seed: int, shapes=None):
        """TAESD weights from ``taesd_encoder`` / ``taesd_decoder`` paths, else random
        (``shapes``: :meth:`param_shapes`, when already known; host numpy only then)."""
        params = host_random_params(shapes or self.param_shapes(), seed, jitter=0.02)
        if self.kind == "taesd":
            from diffjax.models.taesd import load_taesd

            for part, path in zip(("encoder", "decoder"), self.paths):
                if path:
                    params[part] = load_taesd(path, kind=part)[1]
        return params

    def encode(self, params, x01):
        if self.kind == "sd":
            raw = self.vae.apply({"params": params}, 2.0 * x01 - 1.0, method="encode").mean
        else:
            raw = self.modules[0].apply({"params": params["encoder"]}, x01)
        return (raw.astype(jnp.float32) - self.shift) * self.scaling

    def decode(self, params, y):
        raw = y / self.scaling + self.shift
        if self.kind == "sd":
            return (self.vae.apply({"params": params}, raw, method="decode") + 1.0) / 2.0
        return self.modules[1].apply({"params": params["decoder"]}, raw).astype(jnp.float32)


class _DiffAEParams:
    """What the image and video DiffAE codecs share: the checked, cached preparation of the
    parameters (fingerprint, factorized table, medians), rate points and prior rows."""

    #: parameter groups a model of this codec must have (besides ``entropy``)
    param_groups: tuple = ("encoder", "unet", "vae")

    def _set_rates(self, quality, quant_steps) -> None:
        """The rate points (one quantisation step each, all positive) and ``quality``'s check."""
        self.quant_steps = tuple(float(s) for s in quant_steps)
        if not self.quant_steps or min(self.quant_steps) <= 0:
            raise InputError(f"quant_steps must be positive, got {quant_steps!r}")
        self.qualities = tuple(range(len(self.quant_steps)))
        self._check_quality(quality)

    def _check_quality(self, quality) -> None:
        if not (isinstance(quality, (int, np.integer)) and quality in self.qualities):
            raise InputError(f"quality must be one of {self.qualities}, got {quality!r}")

    def _prepared(self, params):
        return self._cache.get(params, self._prepare)

    def _prepare(self, params):
        try:
            eb = params["entropy"]
            missing = [k for k in self.param_groups if k not in params]
        except (KeyError, TypeError) as err:
            raise InputError(f"params are not {self.name} codec parameters") from err
        if missing:
            raise InputError(f"{self.name} codec params lack {missing}")
        table = factorized_table(eb)
        return (fingerprint_pytree(params, self._config, table.digest()), table,
                factorized_medians(eb))

    def fingerprint(self, params: Any) -> bytes:
        return self._prepared(params)[0]

    def at_quality(self, quality: int):
        """This codec at another rate point, sharing networks, tables and compilations."""
        self._check_quality(quality)
        other = copy.copy(self)
        other.quality = int(quality)
        return other

    def rows(self, quality: int, shape) -> np.ndarray:
        """Bottleneck row (density) of every symbol of quality ``quality``."""
        base = quality * self.latent_channels
        return np.broadcast_to(np.arange(base, base + self.latent_channels, dtype=np.int32),
                               tuple(shape))


@register("diffae")
class DiffAECodec(_DiffAEParams, Codec):
    """Diffusion-autoencoder image codec (see the module docstring).

        codec = diffjax.codecs.get("diffae", quality=2, **config)     # experiments/configs
        params = codec.init(jax.random.key(0))
        data = codec.encode(params, image)
        image2 = codec.decode(params, data, num_steps=30)
    """

    name = "diffae"
    codec_id = 4

    def __init__(self, quality: int = 1, *, vae: str = "taesd", vae_config: Mapping | None = None,
                 unet_config: Mapping | None = None, latent_channels: int = 16,
                 encoder_width: float = 1.0, encoder_depth: float = 1.0,
                 quant_steps: Sequence[float] = QUANT_STEPS, num_steps: int = 10,
                 guidance_scale: float = 3.0, seed: int = 0, prediction_type: str = "sample",
                 dtype: Any = jnp.float32):
        from diffjax.models.unet import UNet2DConditionModel

        self._set_rates(quality, quant_steps)
        if vae_config is None or unet_config is None:
            raise InputError("the diffae codec needs vae_config and unet_config "
                             "(see experiments/configs/diffae.py)")
        self.quality, self.seed = int(quality), int(seed) & 0xFFFFFFFF
        self.num_steps, self.guidance_scale = _check_steps(num_steps), float(guidance_scale)
        self.latent_channels = int(latent_channels)
        self.first_stage = FirstStage(vae, vae_config, dtype)
        self.encoder = DiffAEEncoder(self.latent_channels, float(encoder_width),
                                     float(encoder_depth), dtype=dtype)
        self.entropy = EntropyBottleneck(len(self.quant_steps) * self.latent_channels)
        c = self.first_stage.channels
        # what the UNet outputs: x0 ("sample", the thesis's best), "epsilon" or
        # "v_prediction" (the Table 1 ablation); the sampler converts
        self.prediction_type = canonical_prediction_type(prediction_type)
        unet_cfg = dict(unet_config, in_channels=c + self.latent_channels + 1, out_channels=c,
                        prediction_type=self.prediction_type)
        self.unet = UNet2DConditionModel.from_config(unet_cfg, dtype=dtype)
        self.cross_attention_dim = int(np.ravel([self.unet.cross_attention_dim])[0])
        self.scheduler_config = dict(SCHEDULER, prediction_type=self.prediction_type)
        self.schedule = DiscreteSchedule.from_config(self.scheduler_config)
        self.up = 32 // self.first_stage.factor  # latent grid -> first-stage grid
        if self.up * self.first_stage.factor != 32:
            raise InputError(f"the first stage's factor {self.first_stage.factor} must divide 32")
        self.stride = math.lcm(32, self.first_stage.factor * 2 ** self.unet.num_upsamplers)
        self._config = json.dumps(["diffae", vae, dict(vae_config), unet_cfg, latent_channels,
                                   encoder_width, encoder_depth, self.quant_steps,
                                   self.scheduler_config], sort_keys=True, default=str).encode()
        self._cache = IdentityCache()
        self._jitted: dict = {}

    # ----------------------------------------------------------------- parameters
    def param_shapes(self) -> dict:
        """``ShapeDtypeStruct`` trees of the encoder (``params``, ``batch_stats``), the
        UNet and the first stage (traced, nothing computed)."""
        x = jnp.zeros((1, 32, 32, 3))
        enc = nn.unbox(jax.eval_shape(self.encoder.init, jax.random.key(0), x))
        args, kw = self.unet.dummy_inputs()
        unet = nn.unbox(jax.eval_shape(lambda: self.unet.init(jax.random.key(0), *args, **kw)))
        return {"encoder": dict(enc), "unet": unet["params"],
                "vae": self.first_stage.param_shapes()}

    def init(self, rng: jax.Array) -> dict:
        """Initial parameters: host-drawn encoder/UNet kernels (``N(0, 1/fan_in)``), the
        bottleneck's own initialisers, the first stage from its paths (else random)."""
        seed = int(np.asarray(jax.random.key_data(rng)).ravel()[-1])
        shapes = self.param_shapes()
        stats = jax.tree_util.tree_map_with_path(
            lambda p, a: np.full(a.shape, 1.0 if p[-1].key == "var" else 0.0, a.dtype),
            shapes["encoder"]["batch_stats"])
        entropy = nn.unbox(jax.jit(lambda k: self.entropy.init(  # one compile, not per op
            k, jnp.zeros((1, self.entropy.channels)), train=False))(rng))["params"]
        return {"encoder": {"params": host_random_params(shapes["encoder"]["params"], seed + 1),
                            "batch_stats": stats},
                "entropy": jax.tree_util.tree_map(np.asarray, entropy),
                "unet": host_random_params(shapes["unet"], seed + 2),
                "vae": self.first_stage.load(seed + 3, shapes["vae"])}

    # ----------------------------------------------------------------- networks
    def condition(self, y_hat, log_step):
        """``ŷ [B, h, w, C]`` -> UNet condition on the first-stage grid (+ ``log2 Δ``)."""
        up = jnp.repeat(jnp.repeat(y_hat, self.up, axis=1), self.up, axis=2)
        step = jnp.broadcast_to(jnp.reshape(log_step, (-1, 1, 1, 1)), up.shape[:3] + (1,))
        return jnp.concatenate([up, step.astype(up.dtype)], axis=-1)

    def denoise(self, unet_params, z_t, timesteps, cond):
        """UNet prediction (x0, eps or v: ``prediction_type``) from the noisy first-stage
        latent and the condition."""
        b = z_t.shape[0]
        t = jnp.broadcast_to(jnp.reshape(timesteps, (-1,)), (b,))
        ctx = jnp.zeros((b, 1, self.cross_attention_dim), z_t.dtype)
        return self.unet.apply({"params": unet_params}, jnp.concatenate([z_t, cond], -1), t, ctx)

    # the training loss's hooks (shared with the video codec, see diffae_loss)
    def train_latents(self, params, x01, key):
        """``(y, new batch statistics)``: the encoder in training mode."""
        y, upd = self.encoder.apply(params["encoder"], x01, train=True, mutable=["batch_stats"],
                                    rngs={"dropout": key})
        return y, upd["batch_stats"]

    def train_condition(self, params, y_tilde, log_step):
        return self.condition(y_tilde, log_step)

    def target_latents(self, vae_params, x01):
        return self.first_stage.encode(vae_params, x01)

    def _fn(self, name: str, num_steps: int = 0):
        key = (name, num_steps)
        if key not in self._jitted:
            if name == "analyze":
                def fn(params, x01, inv_step, medians):
                    y = self.encoder.apply(params["encoder"], x01)
                    return y * inv_step - medians
            else:
                plan = make_plan(self.scheduler_config, "ddpm", num_steps)

                def fn(params, y_hat, log_step, seed, scale):
                    k_init, k_steps = jax.random.split(jax.random.key(seed))
                    cond = self.condition(y_hat, log_step)
                    shape = cond.shape[:3] + (self.first_stage.channels,)
                    z = jax.random.normal(k_init, shape, jnp.float32)
                    guidance = CFG(scale, jnp.zeros_like(cond))
                    z0 = run_plan(plan, lambda x, t, c: self.denoise(params["unet"], x, t, c),
                                  z, key=k_steps, cond=cond, guidance=guidance)
                    x = self.first_stage.decode(params["vae"], z0)
                    return jnp.round(jnp.clip(x, 0.0, 1.0) * 255.0).astype(jnp.uint8)
            self._jitted[key] = jax.jit(fn)
        return self._jitted[key]

    # ----------------------------------------------------------------- protocol
    def encode(self, params: Any, image: np.ndarray) -> bytes:
        return self.encode_batch(params, [image])[0]

    def decode(self, params: Any, data: bytes, *, num_steps: int | None = None,
               guidance_scale: float | None = None, steps: int | None = None) -> np.ndarray:
        """``steps``: the CLI's ``--steps`` (an alias of ``num_steps``, the DDPM steps)."""
        return self.decode_batch(params, [data], guidance_scale=guidance_scale,
                                 num_steps=num_steps if steps is None else steps)[0]

    def latents(self, params: Any, images: np.ndarray) -> np.ndarray:
        """The unquantised latents ``y [B, h, w, C]`` of a same-size uint8 batch (host)."""
        x = pad_to_multiple(np.asarray(images), self.stride).astype(np.float32) / 255.0
        return np.asarray(self._fn("analyze")(params, x, np.float32(1.0),
                                              np.zeros((self.latent_channels,), np.float32)))

    def encode_batch(self, params: Any, images: Sequence[np.ndarray]) -> list:
        fingerprint, table, medians = self._prepared(params)
        images = [check_image(im) for im in images]
        q, step = self.quality, self.quant_steps[self.quality]
        rows = self.rows(q, (self.latent_channels,))  # this quality's densities
        out: list = [None] * len(images)
        for members in group_indexes(images, lambda im: im.shape).values():
            x = np.stack([pad_to_multiple(images[i], self.stride) for i in members])
            v = self._fn("analyze")(params, x.astype(np.float32) / 255.0,
                                    np.float32(1.0 / step), medians[rows])
            symbols = check_symbols(np.asarray(v))
            for j, i in enumerate(members):
                stream = coder.encode(symbols[j], self.rows(q, symbols[j].shape), table)
                h, w = images[i].shape[:2]
                out[i] = bitstream.pack(self.codec_id, fingerprint,
                                        [_META.pack(self.seed), stream], height=h, width=w,
                                        quality=q)
        return out

    def latent_shape(self, height: int, width: int) -> tuple:
        s = self.stride
        return (-(-height // s) * s // 32, -(-width // s) * s // 32, self.latent_channels)

    def _unpack(self, data: bytes, fingerprint: bytes):
        header, sections = bitstream.unpack(data, codec_id=self.codec_id, fingerprint=fingerprint)
        if (header.frames, header.channels, len(sections)) != (1, 3, 2) or \
                len(sections[0]) != _META.size:
            raise CorruptError("diffae bitstream has the wrong section layout")
        if header.quality not in self.qualities:
            raise CorruptError(f"diffae bitstream quality {header.quality} is not one of "
                               f"this model's {self.qualities}")
        return header, sections, _META.unpack(sections[0])[0]

    def _read(self, data: bytes, fingerprint: bytes, table, medians) -> dict:
        header, sections, seed = self._unpack(data, fingerprint)
        q = header.quality
        shape = self.latent_shape(header.height, header.width)
        try:
            sym = coder.decode(sections[1], self.rows(q, shape), table)
        except CorruptError as err:
            raise CorruptError(f"diffae latent stream does not decode: {err}") from err
        y_hat = (sym + medians[self.rows(q, shape)]) * self.quant_steps[q]
        return dict(header=header, y=y_hat.astype(np.float32), q=q, seed=seed)

    def decoded_latents(self, params: Any, data: bytes) -> np.ndarray:
        """The dequantised latent ``ŷ [h, w, C]`` a bitstream carries (what the decoder
        is conditioned on)."""
        fingerprint, table, medians = self._prepared(params)
        return self._read(data, fingerprint, table, medians)["y"]

    def decode_batch(self, params: Any, datas: Sequence[bytes], *, num_steps: int | None = None,
                     guidance_scale: float | None = None) -> list:
        """Decode bitstreams; ``num_steps`` (DDPM steps) and ``guidance_scale`` override the
        codec's defaults. Same-size, same-quality, same-seed files share one network call."""
        fingerprint, table, medians = self._prepared(params)
        k = self.num_steps if num_steps is None else _check_steps(num_steps)
        scale = self.guidance_scale if guidance_scale is None else float(guidance_scale)
        items = [self._read(data, fingerprint, table, medians) for data in datas]
        out: list = [None] * len(items)
        for members in group_indexes(items, lambda it: (it["y"].shape, it["q"],
                                                        it["seed"])).values():
            first = items[members[0]]
            y = np.stack([items[i]["y"] for i in members])
            log_step = np.full((len(members),), math.log2(self.quant_steps[first["q"]]),
                               np.float32)
            x = np.asarray(self._fn("synthesize", k)(params, y, log_step,
                                                     np.uint32(first["seed"]),
                                                     np.float32(scale)))
            for j, i in enumerate(members):
                h = items[i]["header"]
                out[i] = crop(x[j], h.height, h.width)
        return out


def _check_steps(num_steps) -> int:
    if not (isinstance(num_steps, (int, np.integer)) and 1 <= num_steps <= 1000):
        raise InputError(f"num_steps must be an integer in 1..1000, got {num_steps!r}")
    return int(num_steps)


# ----------------------------------------------------------------------------- training loss


def diffae_loss(codec: DiffAECodec, params: Mapping, x01: jax.Array, key: jax.Array, *,
                rate_weight: float = 0.01, p_uncond: float = 0.1,
                weighting: Weighting | None = None, quality=None, aux_weight: float = 1.0):
    """``(loss, metrics, new_batch_stats)`` of one batch ``x01 [B, H, W, 3]`` in ``[0, 1]``
    (or, for the video codec, ``[B, T, H, W, 3]`` frame groups: the same loss through its
    ``train_latents`` / ``train_condition`` / ``target_latents``, Rampas 2024 sec. 3.4.1).

    ``loss = denoising loss + rate_weight * bpp + aux``: the weighted denoising loss
    (the codec's ``prediction_type`` -- x0 by default -- with ``weighting``, min-SNR(5) by
    default: Rampas 2024, Table 1 and sec. 3.3) of the first-stage latent
    given the noisy condition ``ŷ = (y / Δ_q + u) Δ_q`` (``u ~ U(-1/2, 1/2)``, a quality
    ``q`` drawn per example unless ``quality`` [B] is given), dropped to zeros with
    probability ``p_uncond`` (for CFG); bits from the learned prior of the drawn quality;
    ``aux`` fits the bottleneck's quantiles (CompressAI). The first stage is frozen.
    """
    weighting = weighting or Weighting("min_snr", gamma=5.0)
    k_q, k_noise, k_drop, k_diff, k_sd = jax.random.split(key, 5)
    b = x01.shape[0]
    y, stats = codec.train_latents(params, x01, k_sd)  # [B, ..., C] (frames: [B, T', h, w, C])
    nq, c = len(codec.quant_steps), codec.latent_channels
    q = jax.random.randint(k_q, (b,), 0, nq) if quality is None else jnp.asarray(quality)
    steps = jnp.asarray(codec.quant_steps, jnp.float32)
    v = jnp.concatenate([y / s for s in codec.quant_steps], axis=-1)  # every quality's symbols
    v_tilde, lik = codec.entropy.apply({"params": params["entropy"]}, v, train=True,
                                       rngs={"noise": k_noise})
    ones = (1,) * (y.ndim - 2)
    pick = jax.nn.one_hot(q, nq).reshape((b,) + ones + (nq, 1))
    shape = y.shape[:-1] + (nq, c)
    y_tilde = jnp.sum(v_tilde.reshape(shape) * pick, axis=-2) * steps[q].reshape((b, 1) + ones)
    lik_q = jnp.sum(lik.reshape(shape) * pick, axis=-2)
    bpp = bits(lik_q, per_example=True) / math.prod(x01.shape[1:-1])  # per pixel (of all frames)
    keep = jax.random.bernoulli(k_drop, 1.0 - p_uncond, (b,) + (1,) * (x01.ndim - 1))
    cond = codec.train_condition(params, y_tilde, jnp.log2(steps[q])) * keep.astype(jnp.float32)
    z0 = jax.lax.stop_gradient(codec.target_latents(params["vae"], x01))
    diff, aux = denoising_loss(lambda zt, t, cd: codec.denoise(params["unet"], zt, t, cd), z0,
                               k_diff, schedule=codec.schedule,
                               prediction_type=codec.prediction_type, weighting=weighting,
                               cond=cond)
    aux_loss = codec.entropy.apply({"params": params["entropy"]}, method="aux_loss")
    loss = diff + rate_weight * jnp.mean(bpp) + aux_weight * aux_loss
    metrics = {"loss": loss, "diffusion": diff, "bpp": jnp.mean(bpp), "aux": aux_loss,
               "target_mse": jnp.mean(aux["per_example"])}
    return loss, metrics, stats
