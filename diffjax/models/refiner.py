"""The residual diffusion codec network (Brenig & Timofte, "Higher fidelity perceptual image
and video compression with a latent conditioned residual denoising diffusion model").

Two parts, trained together:

* **Base**: the mean-scale hyperprior (Minnen et al. 2018, :class:`HyperpriorModel`), made
  rate-adaptive with per-quality *gain units* (Cui et al., "Asymmetric gained deep image
  compression with continuous rate adaptation", CVPR 2021, sec. 3.2): ``y_q = g_a(x) ⊙ G_q``
  is quantised and coded, and the synthesis sees ``ŷ_q ⊙ G⁻¹_q``. One set of weights covers
  every rate point (the quality index picks a row of ``G``/``G⁻¹``). Because the gains are
  per-channel scalars they fold exactly into the last analysis conv and the first synthesis
  deconv (:func:`fold_quality`), so a quality level *is* a plain hyperprior and reuses the
  hyperprior codec and bitstream unchanged.
* **Refiner**: a small UNet from the shared SD-compatible blocks
  (:class:`~diffjax.models.unet.UNet2DConditionModel`, ResNet blocks only) that denoises the
  *residual* ``r = s · (x − x̂_base)`` (``s = residual_scale``) given the base reconstruction,
  the decoded latent ``ŷ ⊙ G⁻¹`` (nearest-upsampled) and a one-hot quality map, concatenated
  at the input (the poster's latent conditioning). For CPU speed the UNet runs at 1/``patch``
  resolution: a space-to-depth stem folds ``patch × patch`` pixel blocks into channels and a
  depth-to-space head unfolds the output (as in ESPCN, Shi et al. 2016).

Prediction target: **x0 (the residual itself, diffusers' ``"sample"``)**. The loss of the
poster is computed on the refined image ``x̂ = x̂_base + r̂₀ / s`` (MSE + LPIPS), which is
exactly the network output under x0-prediction, with no 1/√ᾱ amplification at high noise
(eps-prediction would divide by ``sqrt(alpha_bar) ≈ 0`` at the first of the few decoding
steps); and a deterministic few-step DDIM with x0-prediction returns the network's last
estimate directly.
"""
from __future__ import annotations

from typing import Any, Mapping

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffjax.entropy.models import DEFAULT_SCALE_TABLE
from diffjax.models.hyperprior import HyperpriorModel
from diffjax.models.unet import UNet2DConditionModel

Dtype = Any

# The diffusion process of the refiner (a diffusers DDIMScheduler config): iDDPM cosine
# noise levels, x0 ("sample") prediction, "trailing" spacing so the first of a few
# decoding steps starts at t = 999 (pure noise), no clipping (residuals are signed).
SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "prediction_type": "sample",
    "clip_sample": False,
    "set_alpha_to_one": True,
    "timestep_spacing": "trailing",
}
LATENT_STRIDE = 16  # g_a downsamples by 16


def sample_refined(denoise, x_base: jax.Array, key: jax.Array, residual_scale: float,
                   num_steps: int) -> jax.Array:
    """The refined decode of the residual codecs (Brenig & Timofte): DDIM over the scaled
    residual ``r = s (x - x_base)`` from noise drawn with ``key`` (``num_steps`` deterministic
    steps of :data:`SCHEDULER_CONFIG`), then ``x = clip(x_base + r_0 / s)`` as uint8.

    ``denoise(r_t, t)`` is the conditioned UNet; ``x_base`` is in [0, 1]."""
    from diffjax.diffusion import sample

    noise = jax.random.normal(key, x_base.shape, jnp.float32)
    r0 = sample(denoise, noise, scheduler_config=SCHEDULER_CONFIG, sampler="ddim",
                num_inference_steps=num_steps)
    x = jnp.clip(x_base + r0 / residual_scale, 0.0, 1.0)
    return jnp.round(x * 255.0).astype(jnp.uint8)


def space_to_depth(x: jax.Array, p: int) -> jax.Array:
    """``[B, H, W, C] -> [B, H/p, W/p, p·p·C]`` (pixel unshuffle)."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h // p, w // p, p * p * c)


def depth_to_space(x: jax.Array, p: int) -> jax.Array:
    """Inverse of :func:`space_to_depth`: ``[B, h, w, p·p·C] -> [B, h·p, w·p, C]``."""
    b, h, w, c = x.shape
    x = x.reshape(b, h, w, p, p, c // (p * p)).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h * p, w * p, c // (p * p))


class ResidualRefiner(nn.Module):
    """Latent-conditioned residual denoiser (see the module docstring).

    Call: ``(r_t [B,H,W,3], timesteps [B], x_base [B,H,W,3] in [0,1], y [B,H/16,W/16,M],
    quality [B] int) -> r̂₀ [B,H,W,3]`` (float32). ``H, W`` must be multiples of
    ``patch · 2^(len(block_out_channels) − 1)``.
    """

    block_out_channels: tuple = (32, 64)
    layers_per_block: int = 1
    norm_num_groups: int = 8
    patch: int = 4
    num_qualities: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, r_t, timesteps, x_base, y, quality):
        b, h, w, _ = r_t.shape
        p = self.patch
        chex.assert_shape([r_t, x_base], (b, h, w, 3))
        chex.assert_shape(y, (b, h // LATENT_STRIDE, w // LATENT_STRIDE, None))
        inp = jnp.concatenate([space_to_depth(r_t.astype(jnp.float32), p),
                               space_to_depth(x_base.astype(jnp.float32) * 2.0 - 1.0, p),
                               latent_condition(y, quality, self.num_qualities, p)], axis=-1)
        return run_refiner_unet(self, inp, timesteps, (b, h, w))


def latent_condition(y: jax.Array, quality, num_qualities: int, p: int) -> jax.Array:
    """The poster's latent conditioning at the UNet's resolution: ``y [B, H/16, W/16, M]``
    nearest-upsampled to ``[B, H/p, W/p, M]``, then a one-hot quality map ``[.., Q]``."""
    b, hy, wy, _ = y.shape
    f = LATENT_STRIDE // p
    y_up = jnp.repeat(jnp.repeat(y.astype(jnp.float32), f, axis=1), f, axis=2)
    onehot = jax.nn.one_hot(jnp.asarray(quality, jnp.int32).reshape(b), num_qualities)
    q_map = jnp.broadcast_to(onehot[:, None, None, :], (b, hy * f, wy * f, num_qualities))
    return jnp.concatenate([y_up, q_map], axis=-1)


def run_refiner_unet(module: nn.Module, inp: jax.Array, timesteps, shape) -> jax.Array:
    """The refiner UNet of ``module`` (a refiner with ``block_out_channels``,
    ``layers_per_block``, ``norm_num_groups``, ``patch``, ``dtype``, ``param_dtype``), called
    from its compact ``__call__``: ``inp [B, H/p, W/p, C]`` (the concatenated inputs) ->
    ``r̂₀ [B, H, W, 3]``. Its parameters are ``unet/...`` whatever ``C`` is, so refiners with
    other conditions share every parameter but ``unet/conv_in/kernel``'s input rows
    (:mod:`diffjax.models.video_refiner` starts from the image refiner this way)."""
    b, h, w = shape
    p = module.patch
    n = len(module.block_out_channels)
    unet = UNet2DConditionModel(
        in_channels=inp.shape[-1], out_channels=3 * p * p,
        down_block_types=("DownBlock2D",) * n, up_block_types=("UpBlock2D",) * n,
        mid_block_type="UNetMidBlock2D", block_out_channels=tuple(module.block_out_channels),
        layers_per_block=module.layers_per_block, norm_num_groups=module.norm_num_groups,
        cross_attention_dim=8, attention_head_dim=1, prediction_type="sample",
        dtype=module.dtype, param_dtype=module.param_dtype, parent=module, name="unet")
    # No cross-attention blocks: the (required) context is a dummy that nothing reads.
    out = unet(inp.astype(module.dtype), timesteps, jnp.zeros((b, 1, 8), module.dtype))
    out = depth_to_space(out.astype(jnp.float32), p)
    chex.assert_shape(out, (b, h, w, 3))
    return out


def _gain_init(num_qualities: int):
    """Gains spread over two octaves (coarse to fine quantisation), all channels equal."""
    def init(key, shape, dtype=jnp.float32, inverse=False):
        del key
        g = np.exp2(np.linspace(-1.0, 1.0, num_qualities)) if num_qualities > 1 else np.ones(1)
        g = 1.0 / g if inverse else g
        return jnp.broadcast_to(jnp.asarray(g, dtype)[:, None], shape)
    return init


class ResidualCodecModel(nn.Module):
    """Gained mean-scale hyperprior + residual refiner (see the module docstring).

    ``__call__(x, quality, train=...)`` runs the base codec and returns ``{"x_base",
    "y_cond", "likelihoods": {"y", "z"}}``; :meth:`denoise` runs the refiner. Parameters:
    ``{"base": HyperpriorModel params, "gain": [Q, M], "inv_gain": [Q, M], "refiner": ...}``.
    """

    N: int = 64
    M: int = 96
    num_qualities: int = 4
    refiner_channels: tuple = (32, 64)
    refiner_layers: int = 1
    refiner_groups: int = 8
    patch: int = 4
    residual_scale: float = 5.0
    train_quantization: str = "mixed"
    scale_table: tuple = DEFAULT_SCALE_TABLE
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.base = HyperpriorModel(N=self.N, M=self.M, mean_scale=True,
                                    scale_table=tuple(self.scale_table),
                                    train_quantization=self.train_quantization, **kw)
        init = _gain_init(self.num_qualities)
        shape = (self.num_qualities, self.M)
        self.gain = self.param("gain", init, shape, self.param_dtype)
        self.inv_gain = self.param("inv_gain", lambda k, s, d: init(k, s, d, inverse=True),
                                   shape, self.param_dtype)
        self.refiner = ResidualRefiner(tuple(self.refiner_channels), self.refiner_layers,
                                       self.refiner_groups, self.patch, self.num_qualities, **kw)

    @property
    def multiple(self) -> int:
        """Image sides must be multiples of this (the hyperprior's stride, 64)."""
        return 64

    def __call__(self, x: jax.Array, quality: jax.Array, *, train: bool) -> dict:
        """``x [B, H, W, 3]`` in [0, 1] (H, W multiples of 64), ``quality [B]`` in [0, Q)."""
        chex.assert_rank(x, 4)
        b, h, w, _ = x.shape
        q = jnp.asarray(quality, jnp.int32).reshape(b)
        out = gained_base_pass(self, x, q, train=train)
        if self.is_initializing():  # create the refiner's parameters too
            self.denoise(jnp.zeros_like(x), jnp.zeros((b,)), out["x_base"], out["y_cond"], q)
        return out

    def denoise(self, r_t, timesteps, x_base, y_cond, quality) -> jax.Array:
        """The refiner's x0 estimate of the scaled residual (see :class:`ResidualRefiner`)."""
        return self.refiner(r_t, timesteps, x_base, y_cond, quality)

    def aux_loss(self) -> jax.Array:
        return self.base.aux_loss()

    def config(self) -> dict:
        """The JSON-able constructor arguments (saved beside shipped weights)."""
        return {"N": self.N, "M": self.M, "num_qualities": self.num_qualities,
                "refiner_channels": list(self.refiner_channels),
                "refiner_layers": self.refiner_layers, "refiner_groups": self.refiner_groups,
                "patch": self.patch, "residual_scale": self.residual_scale}


def gained_base_pass(module: nn.Module, x: jax.Array, q: jax.Array, *, train: bool) -> dict:
    """The gained hyperprior of ``module`` (with ``base``, ``gain``, ``inv_gain`` and
    ``train_quantization``) on ``x [B, H, W, 3]`` at quality indices ``q [B]``:
    ``{"x_base", "y_cond" (= ŷ ⊙ G⁻¹), "likelihoods": {"y", "z"}}``."""
    b, h, w, _ = x.shape
    mode = module.train_quantization if train else "round"
    gain = module.gain[q][:, None, None, :]
    inv_gain = module.inv_gain[q][:, None, None, :]
    y = module.base.analysis(x) * gain
    z = module.base.hyper_analysis(y)
    z_hat, z_lik = module.base.entropy_bottleneck(z, train=train, mode=mode)
    scales, means = module.base.hyper_synthesis(z_hat)
    y_hat, y_lik = module.base.gaussian_conditional(y, scales, means, train=train, mode=mode)
    y_cond = y_hat * inv_gain
    x_base = module.base.synthesis(y_cond)
    chex.assert_shape(x_base, (b, h, w, 3))
    return {"x_base": x_base, "y_cond": y_cond, "likelihoods": {"y": y_lik, "z": z_lik}}


def fold_quality(params: Mapping[str, Any], quality: int) -> dict:
    """The plain :class:`HyperpriorModel` parameters of quality index ``quality``.

    ``g_a``'s last conv is scaled by ``G_q`` per output channel (kernel and bias), ``g_s``'s
    first transposed conv by ``G⁻¹_q`` per input channel (Flax ``transpose_kernel`` layout
    ``[k, k, out, in]``); everything else is shared. Exact up to float rounding.
    """
    base = jax.tree_util.tree_map(lambda a: a, dict(params["base"]))
    g = jnp.asarray(params["gain"])[quality]
    ig = jnp.asarray(params["inv_gain"])[quality]
    g_a, g_s = dict(base["g_a"]), dict(base["g_s"])
    conv3 = dict(g_a["conv3"])
    conv3["kernel"] = jnp.asarray(conv3["kernel"]) * g
    conv3["bias"] = jnp.asarray(conv3["bias"]) * g
    deconv0 = dict(g_s["deconv0"])
    deconv0["kernel"] = jnp.asarray(deconv0["kernel"]) * ig
    g_a["conv3"], g_s["deconv0"] = conv3, deconv0
    base["g_a"], base["g_s"] = g_a, g_s
    return jax.tree_util.tree_map(jnp.asarray, base)
