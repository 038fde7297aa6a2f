"""The foundation latent codec (Relic et al., "Lossy Image Compression with Foundation
Diffusion Models", ECCV 2024): adaptive quantisation of a latent-diffusion latent, a
predicted denoising start ``t`` and partial DDIM on a frozen backbone.

Encode (Algorithm 1 of the paper): ``y = E_vae(x)``; ``gamma, t = P(y, lambda)``;
``z = round(T(y, gamma))`` is coded with a scale hyperprior; ``gamma`` and ``t`` travel as
side information (float16). Decode: ``y_hat = T^-1(z, gamma)``; the diffusion state is
``y_t = alpha(t) * y_hat`` (variance-preserving: the quantisation error plays the part of
``sigma(t) * eps``); ``k`` DDIM steps (Song et al. 2021, eq. 12, ``eta = 0``, no fresh
noise) of the frozen UNet at the continuous times ``t, (k-1)t/k, ..., t/k`` bring it to
``t = 0``; ``x = D_vae(y_0)``. ``k = max(1, ceil(t * num_inference_steps))``, i.e. the
steps of a ``num_inference_steps``-step run that fall below ``t`` (2-7 % of the process in
the paper); ``t`` and ``k`` can be overridden at decode time.

Training (:func:`foundation_loss`, :class:`FoundationTask`): VAE and UNet frozen; one
x0-prediction step at the continuous ``t`` (``alpha(t)`` from the PCHIP-continuous schedule
of :mod:`diffjax.diffusion.schedules`, so the gradient reaches ``t``);
``loss = bpp + lambda * MSE(x, x_hat)`` (``x`` in ``[0, 1]``) with ``lambda`` drawn from
``{1, 5, 10, 20}`` per step. A one-step decode (``k = 1``) is exactly that training-time
reconstruction with hard rounding.

Backbones (:class:`Backbone`): an SD-compatible ``AutoencoderKL`` + ``UNet2DConditionModel``
(``diffjax convert`` output, any SD config) or a TAESD-family autoencoder (e.g. TAEF2) with
any ``UNet2DConditionModel`` trained on its latents. **Text conditioning**: the UNet's
cross-attention context is ``params["context"]`` ``[1, S, D]`` -- the empty-prompt
embedding, computed once by the user with the text encoder they have (SD 2.1: OpenCLIP
ViT-H on ``""``, ``[1, 77, 1024]``) -- or zeros when absent.

Bitstream (codec id 3, quality byte = lambda): ``meta`` (``t`` and ``gamma`` as float16,
``2 + 4 C`` bytes), the hyper-latent stream and the latent stream (each stream carries the
CRC32 of its symbols, :mod:`diffjax.entropy.coder`).
"""
from __future__ import annotations

import json
import math
import struct
from typing import Any, Mapping, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

from diffjax import compile as compile_backbone
from diffjax.codecs.base import Codec, check_image, crop, fingerprint_pytree, pad_to_multiple, register
from diffjax.diffusion.parameterization import canonical_prediction_type, to_x0
from diffjax.diffusion.samplers import Plan, get_sampler
from diffjax.diffusion.sampling import run_plan
from diffjax.diffusion.schedules import continuous_schedule, load_scheduler_config
from diffjax.entropy import bitstream, coder
from diffjax.entropy.bitstream import CorruptError
from diffjax.entropy.latent_coder import IdentityCache, LatentCoder, group_indexes
from diffjax.entropy.models import (DEFAULT_SCALE_TABLE, bits, factorized_medians,
                                    factorized_table, gaussian_table)
from diffjax.errors import InputError
from diffjax.models.param_estimator import FoundationModel, affine_inverse, affine_forward
from diffjax.train.task import Task

LAMBDAS = (1.0, 5.0, 10.0, 20.0)
HYPER_STRIDE = 4  # h_a downsamples the latent by 4


# ----------------------------------------------------------------------------- backbone


class Backbone:
    """The frozen parts: first-stage autoencoder, latent denoiser and noise schedule.

    Args:
      vae: ``"sd"`` (``AutoencoderKL``, ``vae_config`` = its diffusers config) or ``"taesd"``
        (``vae_config = {"latent_channels", "arch_variant", "scaling_factor",
        "shift_factor"}``; params ``{"encoder", "decoder"}`` from :func:`load_taesd`).
      unet_config: diffusers ``UNet2DConditionModel`` config.
      scheduler_config: diffusers scheduler config (``prediction_type`` read from it,
        else from ``unet_config``).

    Diffusion latents are ``(mode(E(x)) - shift) * scaling_factor``; images are ``[0, 1]``.
    """

    def __init__(self, vae: str, vae_config: Mapping, unet_config: Mapping,
                 scheduler_config: Mapping, dtype: Any = jnp.float32):
        from diffjax.models.taesd import TAESDDecoder, TAESDEncoder
        from diffjax.models.unet import UNet2DConditionModel
        from diffjax.models.vae import AutoencoderKL

        vae_config = dict(vae_config)
        self.kind = vae
        if vae == "sd":
            self.vae = AutoencoderKL.from_config(vae_config, dtype=dtype)
            self.latent_channels = self.vae.latent_channels
            self.vae_factor = self.vae.downsample_factor
            self.scaling_factor = float(self.vae.scaling_factor)
            self.shift_factor = float(self.vae.shift_factor or 0.0)
        elif vae == "taesd":
            kw = dict(latent_channels=int(vae_config["latent_channels"]),
                      arch_variant=vae_config.get("arch_variant"), dtype=dtype)
            self.taesd = (TAESDEncoder(**kw), TAESDDecoder(**kw))
            self.latent_channels = kw["latent_channels"]
            self.vae_factor = self.taesd[0].factor
            self.scaling_factor = float(vae_config.get("scaling_factor", 1.0))
            self.shift_factor = float(vae_config.get("shift_factor", 0.0))
        else:
            raise InputError(f"unknown first-stage autoencoder {vae!r}; expected 'sd' or 'taesd'")
        self.unet = UNet2DConditionModel.from_config(dict(unet_config), dtype=dtype)
        if (self.unet.in_channels, self.unet.out_channels) != (self.latent_channels,) * 2:
            raise InputError(f"the UNet maps {self.unet.in_channels} -> {self.unet.out_channels} "
                             f"channels, the autoencoder has {self.latent_channels}")
        sched = load_scheduler_config(scheduler_config)
        self.prediction_type = canonical_prediction_type(
            sched.get("prediction_type", self.unet.prediction_type))
        # x0 clipping to [-1, 1] is meaningless for latents (diffusers' SD configs disable it).
        sched.update(prediction_type=self.prediction_type, clip_sample=False, thresholding=False)
        self.scheduler_config = sched
        self.schedule = continuous_schedule(sched)
        self.ddim_config = get_sampler("ddim").resolve(sched)
        self.t_min = 1.0 / self.schedule.num_train_timesteps  # first training timestep
        self.cross_attention_dim = int(np.ravel([self.unet.cross_attention_dim])[0])
        # The denoiser call, a plain attribute so that tests can instrument it.
        self.unet_apply = lambda p, x, t, ctx: self.unet.apply({"params": p}, x, t, ctx)

    @property
    def stride(self) -> int:
        """Image padding multiple: the hyper-analysis and the UNet's downsamplers."""
        f = self.vae_factor
        return math.lcm(f * HYPER_STRIDE, f * 2 ** self.unet.num_upsamplers)

    def param_shapes(self) -> dict:
        """``{"vae", "unet"}`` parameter shapes (``jax.ShapeDtypeStruct`` tree, no compute)."""
        import flax.linen as nn

        key = jax.random.key(0)
        if self.kind == "sd":
            args, kw = self.vae.dummy_inputs()
            vae = jax.eval_shape(lambda: self.vae.init(key, *args, **kw)["params"])
        else:
            s = self.stride
            vae = jax.eval_shape(lambda: {
                "encoder": self.taesd[0].init(key, jnp.zeros((1, s, s, 3)))["params"],
                "decoder": self.taesd[1].init(
                    key, jnp.zeros((1, 1, 1, self.latent_channels)))["params"]})
        args, kw = self.unet.dummy_inputs()
        unet = jax.eval_shape(lambda: self.unet.init(key, *args, **kw)["params"])
        return nn.unbox({"vae": vae, "unet": unet})

    def random_params(self, seed: int = 0) -> dict:
        """Random ``{"vae", "unet"}`` weights drawn on the host (tests, benchmarks).

        Kernels ``N(0, 1 / fan_in)``, norm scales ``1 + N(0, 0.02)``, everything else
        ``N(0, 0.02)``. Much cheaper than tracing the Flax initialisers of a full SD
        backbone (a jitted SD 2.1 ``init`` compiles for minutes on CPU).
        """
        from diffjax.nn.layers import host_random_params

        return host_random_params(self.param_shapes(), seed, jitter=0.02)

    def encode(self, vae_params, x01: jax.Array) -> jax.Array:
        """Image ``[B, H, W, 3]`` in ``[0, 1]`` -> diffusion latent ``[B, H/f, W/f, C]``."""
        if self.kind == "sd":
            post = self.vae.apply({"params": vae_params}, 2.0 * x01 - 1.0, method="encode")
            raw = post.mean
        else:
            raw = self.taesd[0].apply({"params": vae_params["encoder"]}, x01)
        return ((raw.astype(jnp.float32) - self.shift_factor) * self.scaling_factor)

    def decode(self, vae_params, y: jax.Array) -> jax.Array:
        """Diffusion latent -> image in ``[0, 1]`` (float32, not clipped)."""
        raw = y / self.scaling_factor + self.shift_factor
        if self.kind == "sd":
            x = self.vae.apply({"params": vae_params}, raw, method="decode")
            return (x.astype(jnp.float32) + 1.0) / 2.0
        return self.taesd[1].apply({"params": vae_params["decoder"]}, raw).astype(jnp.float32)

    def context(self, params: Mapping, batch: int) -> jax.Array:
        """The cross-attention context ``[B, S, D]`` (``params["context"]`` or zeros)."""
        ctx = params.get("context") if isinstance(params, Mapping) else None
        if ctx is None:
            ctx = jnp.zeros((1, 1, self.cross_attention_dim), jnp.float32)
        ctx = jnp.asarray(ctx)
        chex.assert_rank(ctx, 3)
        return jnp.broadcast_to(ctx, (batch,) + ctx.shape[1:])

    def clip_t(self, t) -> jax.Array:
        return jnp.clip(jnp.asarray(t, jnp.float32), self.t_min, 1.0)

    def x0_step(self, unet_params, y_hat, t, context) -> jax.Array:
        """One x0-prediction at the continuous ``t`` ``[B]`` from ``y_t = alpha(t) y_hat``."""
        t = self.clip_t(t)
        a, s = self.schedule.alpha_sigma(t)
        a, s = a[:, None, None, None], s[:, None, None, None]
        y_t = a * y_hat
        out = self.unet_apply(unet_params, y_t, self.schedule.model_time(t), context)
        return to_x0(out.astype(jnp.float32), y_t, a, s, self.prediction_type)

    def ddim_plan(self, t, num_steps, max_steps: int) -> Plan:
        """DDIM plan: ``k = num_steps`` steps at times ``t (k - i) / k``, ``i < k``, down to 0.

        Built from the continuous schedule, so ``t [B]`` (per example) and ``k`` may be
        traced: one compilation serves every ``t`` and every ``k <= max_steps``. The plan
        has ``max_steps`` rows; the real steps are the last ``k`` (run them with
        ``start_step = max_steps - k``). Tables are ``[max_steps, B, 1, 1, 1]`` so the
        diffusion core's DDIM step broadcasts them over the batch.
        """
        t = self.clip_t(t)
        k = jnp.asarray(num_steps, jnp.float32)
        left = jnp.arange(max_steps, 0, -1, dtype=jnp.float32)   # steps left incl. this one
        t_now = jnp.minimum(left[:, None] / k * t[None, :], 1.0)  # rows before the start: unused
        t_prev = jnp.minimum((left[:, None] - 1.0) / k * t[None, :], 1.0)
        a_now = self.schedule.alpha_bar(t_now)
        a_prev = jnp.where(t_prev > 0, self.schedule.alpha_bar(t_prev), 1.0)
        var = (1 - a_prev) / (1 - a_now) * (1 - a_now / a_prev)
        col = lambda v: v[..., None, None, None]  # noqa: E731
        return Plan(sampler="ddim", config=self.ddim_config,
                    timesteps=col(self.schedule.model_time(t_now)), alpha=col(jnp.sqrt(a_now)),
                    sigma=col(jnp.sqrt(1 - a_now)),
                    scale=jnp.ones((max_steps + 1,), jnp.float32),
                    tables=dict(a_prev=col(a_prev), sqrt_a_prev=col(jnp.sqrt(a_prev)),
                                var=col(var)))

    def denoise(self, unet_params, y_hat, t, num_steps, context, max_steps: int | None = None):
        """Partial DDIM from ``y_t = alpha(t) y_hat`` to ``y_0`` in ``num_steps`` UNet calls.

        ``num_steps`` may be traced when ``max_steps`` (static, ``>= num_steps``) is given.
        """
        if max_steps is None:
            max_steps = int(num_steps)
        t = self.clip_t(t)
        plan = self.ddim_plan(t, num_steps, max_steps)
        y_t = self.schedule.alpha(t)[:, None, None, None] * y_hat

        def denoise_fn(x, step_t, ctx=None):
            return self.unet_apply(unet_params, x, step_t.reshape(-1), ctx)

        start = max_steps - jnp.asarray(num_steps, jnp.int32)
        return run_plan(plan, denoise_fn, y_t, start_step=start, cond=context)


def steps_bucket(num_steps: int) -> int:
    """Static loop length compiled for ``num_steps`` DDIM steps: 8, 16, 32, ..."""
    return max(8, 1 << (int(num_steps) - 1).bit_length())


# ----------------------------------------------------------------------------- training


def foundation_loss(backbone: Backbone, model: FoundationModel, params: Mapping, x: jax.Array,
                    lam, rng: jax.Array, *, aux_weight: float = 1.0,
                    distortion_scale: float = 1.0):
    """``bpp + lambda * s * MSE(x, x_hat)`` with one x0-prediction step (see the module doc).

    ``x [B, H, W, 3]`` in ``[0, 1]`` (H, W multiples of ``backbone.stride``); ``params`` =
    ``{"vae", "unet", "model", "context"?}``. ``s = distortion_scale`` sets the units of the
    distortion: 1 is MSE on ``[0, 1]`` images as written in the paper's loss (with lambda in
    {1, 5, 10, 20}); a larger ``s`` moves the same four lambdas to higher rates (the
    estimator still sees the plain lambda). Returns ``(loss, metrics)``; the entropy
    bottleneck's aux loss (quantile fit) is added with ``aux_weight``.
    """
    b, h, w, _ = x.shape
    y = jax.lax.stop_gradient(backbone.encode(params["vae"], x))
    out = model.apply({"params": params["model"]}, y, lam, train=True, rngs={"noise": rng})
    y0 = backbone.x0_step(params["unet"], out["y_hat"], out["t"], backbone.context(params, b))
    x_hat = backbone.decode(params["vae"], y0)
    bpp = bits(out["likelihoods"]) / (b * h * w)
    mse = jnp.mean(jnp.square(x_hat - x.astype(jnp.float32)))
    aux = model.apply({"params": params["model"]}, method=lambda m: m.entropy.aux_loss())
    loss = bpp + jnp.mean(jnp.asarray(lam, jnp.float32)) * distortion_scale * mse
    metrics = {"bpp": bpp, "mse": mse, "rd_loss": loss, "aux_loss": aux,
               "psnr": -10.0 * jnp.log10(jnp.maximum(mse, 1e-10)), "t": jnp.mean(out["t"]),
               "lambda": jnp.mean(jnp.asarray(lam, jnp.float32))}
    return loss + aux_weight * aux, metrics


# ----------------------------------------------------------------------------- codec

@register("foundation")
class FoundationCodec(Codec):
    """Codec around a :class:`Backbone` + :class:`~diffjax.models.param_estimator.FoundationModel`.

    ``params = {"vae", "unet", "model", "context"?}`` (see the module docstring);
    ``quality`` is ``lambda`` (1..255; trained on 1, 5, 10, 20). Network stages are jitted
    once per shape (and per step count) and cached on the codec; entropy coding is host-side.

        codec = diffjax.codecs.get("foundation", quality=10, **config)   # see experiments/configs
        data = codec.encode(params, image)
        image2 = codec.decode(params, data)                 # predicted t and step count
        image3 = codec.decode(params, data, t=0.1, num_steps=5)   # decode-time overrides
    """

    name = "foundation"
    codec_id = 3

    def __init__(self, quality: int = 10, *, vae: str = "sd", vae_config: Mapping | None = None,
                 unet_config: Mapping | None = None, scheduler_config: Mapping | None = None,
                 estimator_features: Sequence[int] = (64, 128, 256), hyper_channels: int = 64,
                 num_inference_steps: int = 50, init_t: float = 0.05, dtype: Any = jnp.float32):
        if not (isinstance(quality, (int, np.integer)) and 1 <= quality <= 255):
            raise InputError(f"quality (= lambda) must be an integer in 1..255, got {quality!r}")
        if vae_config is None or unet_config is None or scheduler_config is None:
            raise InputError("the foundation codec needs vae_config, unet_config and "
                             "scheduler_config (see experiments/configs/foundation_sd21.py)")
        self.quality = int(quality)
        self.qualities = tuple(int(v) for v in LAMBDAS)  # the lambdas it is trained on
        self.num_inference_steps = int(num_inference_steps)
        self.backbone = Backbone(vae, vae_config, unet_config, scheduler_config, dtype=dtype)
        self.model = FoundationModel(self.backbone.latent_channels, tuple(estimator_features),
                                     int(hyper_channels), init_t=float(init_t), dtype=dtype)
        self.z_table = gaussian_table(DEFAULT_SCALE_TABLE)  # LatentHyperprior's table
        # JSON (tuples == lists, sorted keys): the same config hashes the same everywhere
        self._config = json.dumps(
            ["foundation", vae, dict(vae_config), dict(unet_config),
             self.backbone.scheduler_config, list(estimator_features), int(hyper_channels)],
            sort_keys=True, default=str).encode()
        self._cache = IdentityCache()
        self._jitted: dict = {}
        self._device_params: dict = {}

    # ----------------------------------------------------------------- parameters
    def init(self, rng: jax.Array, *, backbone: bool = True) -> dict:
        """Random parameters ``{"vae", "unet", "model"}`` (``backbone=False``: ``model`` only).

        Jittable; the random backbone is drawn on the host (:meth:`Backbone.random_params`).
        """
        import flax.linen as nn

        k_b, k_m = jax.random.split(rng)
        s = self.backbone.stride // self.backbone.vae_factor
        y = jnp.zeros((1, s, s, self.backbone.latent_channels))
        model = nn.unbox(self.model.init({"params": k_m, "noise": k_m}, y, 1.0, train=False))
        out = {}
        if backbone:
            seed_words = jax.random.key_data(k_b).reshape(-1)
            out = host_params(self.backbone.param_shapes(),
                              lambda w: self.backbone.random_params(
                                  int.from_bytes(np.asarray(w, "<u4").tobytes(), "little")),
                              seed_words)
        out["model"] = model["params"]
        return out

    def _prepared(self, params: Mapping):
        """``(fingerprint, LatentCoder, hyper-latent medians)``, cached per parameter tree."""
        return self._cache.get(params, self._prepare)

    def _prepare(self, params: Mapping):
        try:
            eb = params["model"]["entropy"]["entropy_bottleneck"]
            missing = [k for k in ("vae", "unet") if k not in params]
        except (KeyError, TypeError) as err:
            raise InputError("params are not foundation codec parameters "
                             "({'vae', 'unet', 'model', 'context'?})") from err
        if missing:
            raise InputError(f"foundation codec params lack {missing}")
        w_table = factorized_table(eb)
        return (fingerprint_pytree(params, self._config, w_table.digest(),
                                   self.z_table.digest()),
                LatentCoder(w_table, self.z_table), factorized_medians(eb))

    def fingerprint(self, params: Any) -> bytes:
        return self._prepared(params)[0]

    # ----------------------------------------------------------------- jitted stages
    def _fn(self, name: str, num_steps: int = 0):
        key = (name, num_steps)
        if key in self._jitted:
            return self._jitted[key]
        bb, m = self.backbone, self.model

        def analyze(params, x, lam, medians):
            y = bb.encode(params["vae"], x)
            gamma, t = m.apply({"params": params["model"]}, y, lam, method="estimate")
            # side information is sent as float16: both ends use the rounded values
            gamma = gamma.astype(jnp.float16).astype(jnp.float32)
            t = bb.clip_t(t.astype(jnp.float16).astype(jnp.float32))
            z = affine_forward(y, gamma)

            def f(mod):
                w = mod.entropy.hyper_analysis(z)
                w_sym = jnp.round(w - medians).astype(jnp.int32)
                idx = mod.entropy.table_indexes(
                    mod.entropy.hyper_synthesis(w_sym.astype(jnp.float32) + medians))
                return w_sym, idx
            w_sym, idx = m.apply({"params": params["model"]}, method=f)
            return jnp.round(z).astype(jnp.int32), w_sym, idx, gamma, t

        def hyper(params, w_sym, medians):
            def f(mod):
                scales = mod.entropy.hyper_synthesis(w_sym.astype(jnp.float32) + medians)
                return mod.entropy.table_indexes(scales)
            return m.apply({"params": params["model"]}, method=f)

        def synthesize(params, z_sym, gamma, t, k):
            y_hat = affine_inverse(z_sym, gamma)
            y0 = bb.denoise(params["unet"], y_hat, t, k, bb.context(params, z_sym.shape[0]),
                            max_steps=num_steps)
            x = bb.decode(params["vae"], y0)
            return jnp.round(jnp.clip(x, 0.0, 1.0) * 255.0).astype(jnp.uint8)

        fn = {"analyze": analyze, "hyper": hyper, "synthesize": synthesize}[name]
        # the UNet + VAE decoder get the backbone compiler options; analyze / hyper keep
        # XLA's defaults (the entropy model's scales must not change between versions)
        jitted = compile_backbone.jit(fn) if name == "synthesize" else jax.jit(fn)
        self._jitted[key] = jitted
        return jitted

    def _synthesize_on_mesh(self, fn, mesh, params, z, gamma, ts, k) -> np.ndarray:
        """Data-parallel synthesis: each device of ``mesh`` decodes its slice of the batch.

        Every device runs the executable that a single-device decode runs (asynchronous
        dispatch, so the devices work concurrently), so a sharded decode is bit-identical to
        decoding each image alone. A ``shard_map``/``pmap`` program of the same function is
        compiled as a multi-replica module and measured to differ in the 7th digit inside the
        DDIM loop on XLA:CPU, which flips an occasional pixel by one level: decoded images
        must not depend on how many devices decoded them. Devices must be addressable (one
        host decodes its own files).
        """
        devices = list(mesh.devices.flat)
        if any(d.process_index != jax.process_index() for d in devices):
            raise InputError("decode on a mesh needs devices of this process only")
        n = len(devices)
        if len(z) % n:
            raise InputError(f"{len(z)} images of one size/step count do not split over the "
                             f"mesh's {n} devices")
        per = len(z) // n
        outs = []
        for i, dev in enumerate(devices):  # dispatch all, then wait
            part = slice(i * per, (i + 1) * per)
            args = jax.device_put((z[part], gamma[part], ts[part]), dev)
            outs.append(fn(self._params_on(params, dev), *args, k))
        return np.concatenate([np.asarray(o) for o in outs])

    def _params_on(self, params, device):
        """``params`` committed to ``device`` (cached: the backbone is large)."""
        key = (id(params), device.id)
        cached = self._device_params.get(key)
        if cached is None or cached[0] is not params:
            cached = (params, jax.device_put(params, device))
            self._device_params[key] = cached
        return cached[1]

    # ----------------------------------------------------------------- steps
    def predicted_steps(self, t: float) -> int:
        """UNet calls a decode makes for side-information ``t``: ``max(1, ceil(t n))``."""
        # 1e-6 absorbs float32 representation error (t = 0.1 -> 5 steps of 50, not 6)
        return max(1, int(math.ceil(float(np.float64(t)) * self.num_inference_steps - 1e-6)))

    def geometry(self, height: int, width: int):
        """``(latent shape, hyper-latent shape)`` of an image of that size (no batch axis)."""
        s, f = self.backbone.stride, self.backbone.vae_factor
        hp, wp = -(-height // s) * s, -(-width // s) * s
        c = self.backbone.latent_channels
        return (hp // f, wp // f, c), (hp // f // HYPER_STRIDE, wp // f // HYPER_STRIDE,
                                       self.model.hyper_channels)

    def _meta_struct(self) -> struct.Struct:
        return struct.Struct(f"<{1 + 2 * self.backbone.latent_channels}e")

    # ----------------------------------------------------------------- protocol
    def encode(self, params: Any, image: np.ndarray) -> bytes:
        return self.encode_batch(params, [image])[0]

    def decode(self, params: Any, data: bytes, *, t: float | None = None,
               num_steps: int | None = None) -> np.ndarray:
        return self.decode_batch(params, [data], t=t, num_steps=num_steps)[0]

    def latents(self, params: Any, images: np.ndarray) -> dict:
        """Symbols and side information of a same-size uint8 batch ``[B, H, W, 3]`` (host)."""
        medians = self._prepared(params)[2]
        x = pad_to_multiple(np.asarray(images), self.backbone.stride).astype(np.float32) / 255.0
        z, w, idx, gamma, t = self._fn("analyze")(params, x, jnp.float32(self.quality), medians)
        z = np.asarray(z)
        if np.abs(z).max(initial=0) > coder.MAX_ABS_SYMBOL:
            raise InputError("latents too large to code (broken parameters?)")
        return {"z_symbols": z, "w_symbols": np.asarray(w), "indexes": np.asarray(idx),
                "gamma": np.asarray(gamma, np.float16), "t": np.asarray(t, np.float16)}

    def encode_batch(self, params: Any, images: Sequence[np.ndarray]) -> list:
        fingerprint, latent_coder, _ = self._prepared(params)
        images = [check_image(im) for im in images]
        meta = self._meta_struct()
        out: list = [None] * len(images)
        for members in group_indexes(images, lambda im: self.geometry(*im.shape[:2])).values():
            lat = self.latents(params, np.stack(
                [pad_to_multiple(images[i], self.backbone.stride) for i in members]))
            for j, i in enumerate(members):
                z, w = lat["z_symbols"][j], lat["w_symbols"][j]
                side = np.concatenate([lat["t"][j:j + 1], lat["gamma"][j].reshape(-1)])
                sections = [meta.pack(*side.astype(np.float16).tolist()),
                            *latent_coder.encode(w, z, lat["indexes"][j])]
                h, wd = images[i].shape[:2]
                out[i] = bitstream.pack(self.codec_id, fingerprint, sections, height=h,
                                        width=wd, quality=self.quality)
        return out

    def _unpack(self, data: bytes, fingerprint: bytes):
        """(header, sections, t, gamma [2, C]) of a bitstream, validated."""
        meta = self._meta_struct()
        header, sections = bitstream.unpack(data, codec_id=self.codec_id,
                                            fingerprint=fingerprint)
        if (header.frames, header.channels, len(sections)) != (1, 3, 3) or \
                len(sections[0]) != meta.size:
            raise CorruptError("foundation bitstream has the wrong section layout")
        side = np.asarray(meta.unpack_from(sections[0]), np.float16).astype(np.float32)
        t, gamma = side[0], side[1:].reshape(2, -1)
        if not (np.all(np.isfinite(side)) and 0.0 < t <= 1.0):
            raise CorruptError("foundation bitstream carries invalid side information")
        return header, sections, t, gamma

    def side_info(self, params: Any, data: bytes) -> dict:
        """What the encoder's estimator chose for a bitstream: ``t``, the DDIM step count a
        default decode runs, and gamma (``log_scale``, ``shift`` per latent channel)."""
        _, _, t, gamma = self._unpack(data, self._prepared(params)[0])
        return {"t": float(t), "steps": self.predicted_steps(t), "log_scale": gamma[0],
                "shift": gamma[1]}

    def decode_batch(self, params: Any, datas: Sequence[bytes], *, t: float | None = None,
                     num_steps: int | None = None, mesh=None) -> list:
        """Decode bitstreams (optionally overriding ``t`` / the step count).

        Images of the same size and step count share one network call; with ``mesh`` the
        network part is split over the mesh's devices, bit-identical to a single-device
        decode (group sizes must divide; see :meth:`_synthesize_on_mesh`).
        """
        if t is not None and not 0.0 < float(t) <= 1.0:
            raise InputError(f"t must be in (0, 1], got {t}")
        if num_steps is not None and not (isinstance(num_steps, (int, np.integer))
                                          and 1 <= num_steps <= 1000):
            raise InputError(f"num_steps must be an integer in 1..1000, got {num_steps!r}")
        fingerprint, latent_coder, medians = self._prepared(params)
        items = []
        for data in datas:
            header, sections, t_i, gamma = self._unpack(data, fingerprint)
            _, w_shape = self.geometry(header.height, header.width)
            w = latent_coder.decode_z(sections[1], w_shape)
            t_i = np.float32(t) if t is not None else t_i
            k = int(num_steps) if num_steps is not None else self.predicted_steps(t_i)
            items.append(dict(header=header, z_data=sections[2], w=w, gamma=gamma, t=t_i, k=k))
        out: list = [None] * len(items)
        hyper = lambda w: (self._fn("hyper")(params, w, medians), None)  # noqa: E731
        for members in group_indexes(items, lambda it: (it["w"].shape, it["k"])).values():
            k = items[members[0]]["k"]
            z, _ = latent_coder.decode_y([items[i]["z_data"] for i in members],
                                         np.stack([items[i]["w"] for i in members]), hyper)
            gamma = np.stack([items[i]["gamma"] for i in members])
            ts = np.asarray([items[i]["t"] for i in members], np.float32)
            synth = self._fn("synthesize", steps_bucket(k))
            if mesh is None:
                x = np.asarray(synth(params, z, gamma, ts, np.int32(k)))
            else:
                x = self._synthesize_on_mesh(synth, mesh, params, z, gamma, ts, np.int32(k))
            for j, i in enumerate(members):
                h = items[i]["header"]
                out[i] = crop(x[j], h.height, h.width)
        return out


# ----------------------------------------------------------------------------- training task


def host_params(template: Any, load, *args) -> Any:
    """Parameters made on the host by ``load(*args) -> pytree of arrays``, jit-compatible.

    The train loop creates parameters under ``jax.jit`` (with ``out_shardings``) and
    ``jax.eval_shape``; a ``pure_callback`` keeps frozen or host-drawn weights out of the
    compiled program (no multi-GB constants) and is not run at all by ``eval_shape``.
    ``template`` is the tree of ``jax.ShapeDtypeStruct`` the result must match.
    """
    flat, treedef = jax.tree.flatten(template)

    def callback(*host_args):
        tree = load(*host_args)
        got_flat, got_def = jax.tree.flatten(tree)
        shapes = [tuple(np.shape(a)) for a in got_flat]
        if got_def != treedef or shapes != [tuple(t.shape) for t in flat]:
            from diffjax.errors import CheckpointError
            raise CheckpointError("pretrained weights do not match the configured backbone")
        return [np.asarray(a, t.dtype) for a, t in zip(got_flat, flat)]

    specs = [jax.ShapeDtypeStruct(t.shape, t.dtype) for t in flat]
    return jax.tree.unflatten(treedef, jax.pure_callback(callback, specs, *args))


def backbone_loaders(paths: Mapping[str, Any]) -> dict:
    """``{"vae"|"unet": () -> params}`` for the frozen backbone parts that ``paths``
    (``pretrained``, ``unet_path``, ``taesd_encoder``/``taesd_decoder``) configure; parts
    without a path are absent (the caller draws them at random). Shared by the tasks that
    train on a frozen backbone (foundation codec, ControlNet)."""
    from diffjax.convert.core import load_pretrained
    from diffjax.models.taesd import load_taesd

    p, out = paths, {}
    if p.get("pretrained"):
        out["vae"] = lambda: load_pretrained(p["pretrained"], "vae")[1]
        out["unet"] = lambda: load_pretrained(p["pretrained"], "unet")[1]
    if p.get("unet_path"):
        out["unet"] = lambda: load_pretrained(p["unet_path"])[1]
    if p.get("taesd_encoder"):
        out["vae"] = lambda: {"encoder": load_taesd(p["taesd_encoder"])[1],
                              "decoder": load_taesd(p["taesd_decoder"])[1]}
    return out


class FoundationTask(Task):
    """Train P(y, lambda) and the latent hyperprior on a frozen backbone (``diffjax.train``).

    Args (``config.task.kwargs``):
      vae, vae_config, unet_config, scheduler_config, estimator_features, hyper_channels,
        init_t: as :class:`FoundationCodec`.
      pretrained: a ``diffjax convert`` pipeline directory (``unet/``, ``vae/``) for
        ``vae="sd"``; the configs are read from it. Without it the backbone is random
        (smoke tests only).
      unet_path: a diffjax model directory holding the UNet alone (e.g. the latent denoiser
        trained on TAEF2 latents); taesd_encoder / taesd_decoder: ``.pth`` paths.
      context_path: ``.npy`` ``[1, S, D]`` empty-prompt context (default: zeros).
      lambdas: the rate-distortion weights; one is drawn per step (``fold_in(lambda_seed,
        step)``), the same for every example of the step.
      distortion_scale: units of the MSE term (see :func:`foundation_loss`); 1 = MSE on
        ``[0, 1]`` images.

    ``codec`` is the matching :class:`FoundationCodec`: trained parameters from the
    checkpoint go straight into ``codec.encode`` / ``codec.decode``.
    """

    per_example_rng = True

    def __init__(self, vae: str = "sd", vae_config: Mapping | None = None,
                 unet_config: Mapping | None = None, scheduler_config: Mapping | None = None,
                 pretrained: str | None = None, unet_path: str | None = None,
                 taesd_encoder: str | None = None, taesd_decoder: str | None = None,
                 context_path: str | None = None, lambdas: Sequence[float] = LAMBDAS,
                 lambda_seed: int = 0, estimator_features: Sequence[int] = (64, 128, 256),
                 hyper_channels: int = 64, init_t: float = 0.05, aux_weight: float = 1.0,
                 num_inference_steps: int = 50, distortion_scale: float = 1.0):
        from diffjax.convert.core import read_model_config

        if pretrained:
            vae_config = read_model_config(f"{pretrained}/vae")["config"]
            unet_config = read_model_config(f"{pretrained}/unet")["config"]
        elif unet_path:
            unet_config = read_model_config(unet_path)["config"]
        if vae == "sd" and (vae_config is None or unet_config is None):
            raise InputError("set task.kwargs.pretrained to a `diffjax convert` SD directory "
                             "(or give vae_config and unet_config for a random backbone)")
        self.vae_config, self.unet_config = dict(vae_config), dict(unet_config or {})
        self.paths = dict(pretrained=pretrained, unet_path=unet_path, context_path=context_path,
                          taesd_encoder=taesd_encoder, taesd_decoder=taesd_decoder)
        if vae == "taesd" and bool(taesd_encoder) != bool(taesd_decoder):
            raise InputError("give both taesd_encoder and taesd_decoder (or neither)")
        self.codec = FoundationCodec(1, vae=vae, vae_config=vae_config, unet_config=unet_config,
                                     scheduler_config=scheduler_config,
                                     estimator_features=estimator_features,
                                     hyper_channels=hyper_channels, init_t=init_t,
                                     num_inference_steps=num_inference_steps)
        self._codec_kwargs = dict(
            vae=vae, vae_config=self.vae_config, unet_config=self.unet_config,
            scheduler_config=scheduler_config, estimator_features=list(estimator_features),
            hyper_channels=int(hyper_channels), init_t=float(init_t),
            num_inference_steps=int(num_inference_steps))
        self.lambdas = tuple(float(v) for v in lambdas)
        if not self.lambdas or min(self.lambdas) <= 0:
            raise InputError(f"lambdas must be positive, got {lambdas}")
        self.lambda_seed = int(lambda_seed)
        self.aux_weight = float(aux_weight)
        self.distortion_scale = float(distortion_scale)
        if self.distortion_scale <= 0:
            raise InputError(f"distortion_scale must be positive, got {distortion_scale}")

    codec_name = "foundation"

    def codec_kwargs(self) -> dict:
        return dict(self._codec_kwargs)

    def provenance(self) -> dict:
        return {"lambdas": list(self.lambdas), "distortion_scale": self.distortion_scale}

    def _loaders(self) -> dict:
        return backbone_loaders(self.paths)

    def init_params(self, rng, batch_spec=None) -> dict:
        params = self.codec.init(rng, backbone=False)
        shapes, loaders = self.codec.backbone.param_shapes(), self._loaders()
        for name in ("vae", "unet"):  # random (smoke runs) unless a path is configured
            load = loaders.get(name) or (lambda n=name: self.codec.backbone.random_params()[n])
            params[name] = host_params(shapes[name], load)
        if self.paths["context_path"]:
            ctx = np.load(self.paths["context_path"])
            if ctx.ndim != 3 or ctx.shape[0] != 1 or ctx.shape[2] != self.codec.backbone.cross_attention_dim:
                raise InputError(f"context {self.paths['context_path']} has shape {ctx.shape}, "
                                 f"expected [1, S, {self.codec.backbone.cross_attention_dim}]")
            params["context"] = jnp.asarray(ctx, jnp.float32)
        return params

    def lambda_for_step(self, step) -> jax.Array:
        """The rate-distortion weight of training step ``step`` (same for the whole batch)."""
        key = jax.random.fold_in(jax.random.key(self.lambda_seed), step)
        i = jax.random.randint(key, (), 0, len(self.lambdas))
        return jnp.asarray(self.lambdas, jnp.float32)[i]

    def loss_fn(self, params, batch, rng, step):
        # The backbone is frozen (param_labels): stop its gradients here so XLA drops the
        # weight gradients of the VAE decoder and UNet instead of computing and discarding
        # them (TAEF2, 128 px crops, batch 8 on a 2-core CPU: more than 10 s -> see the
        # measured step time in experiments/configs/foundation_taef2.py).
        frozen = {k: jax.lax.stop_gradient(v) for k, v in params.items() if k != "model"}
        return foundation_loss(self.codec.backbone, self.codec.model, {**params, **frozen},
                               batch["image"], self.lambda_for_step(step), rng,
                               aux_weight=self.aux_weight,
                               distortion_scale=self.distortion_scale)

    def param_labels(self, params):
        from diffjax.train.optim import TRAINABLE, path_labels

        base = jax.tree_util.tree_map_with_path(
            lambda path, _: "aux" if "quantiles" in jax.tree_util.keystr(path) else TRAINABLE,
            params)
        return path_labels(params, freeze=[r"^vae/", r"^unet/", r"^context"], base=base)
