"""Stable-Diffusion-compatible KL autoencoder (diffusers ``AutoencoderKL``), NHWC.

The first stage of latent diffusion (Rombach et al. 2022, sec. 3.1 and appendix G): a
convolutional encoder maps an image ``x`` in ``[-1, 1]`` to a diagonal Gaussian posterior
``q(z|x) = N(mean, exp(logvar))`` over an ``f = 2^(levels-1)`` times smaller latent, and the
decoder maps latents back. Diffusion models work on ``(z - shift_factor) * scaling_factor``
(SD 1.x/2.x: 0.18215, SDXL: 0.13025; sec. 4.3.2 / appendix D.1 of the paper).

Fields mirror diffusers' ``config.json`` (``from_config(dict)``); methods:

* :meth:`AutoencoderKL.encode` -> :class:`DiagonalGaussian` (``mean``, ``logvar``);
* :meth:`AutoencoderKL.decode` latents -> image;
* :meth:`AutoencoderKL.scale_latents` / :meth:`AutoencoderKL.unscale_latents`.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import chex
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from diffjax.errors import InputError
from diffjax.models import _config
from diffjax.nn.layers import activation, conv2d, group_norm
from diffjax.nn.unet_blocks import DownEncoderBlock2D, UNetMidBlock2D, UpDecoderBlock2D

Dtype = Any


@flax.struct.dataclass
class DiagonalGaussian:
    """Diagonal Gaussian posterior ``N(mean, exp(logvar))``, ``logvar`` clamped to [-30, 20].

    Both arrays are ``[B, h, w, latent_channels]`` float32.
    """

    mean: jax.Array
    logvar: jax.Array

    @property
    def std(self):
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self):
        return jnp.exp(self.logvar)

    def mode(self):
        return self.mean

    def sample(self, key):
        """Reparameterised sample ``mean + std * eps``."""
        return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)

    def kl(self):
        """KL(q || N(0, I)) summed over latent dims -> ``[B]``."""
        return 0.5 * jnp.sum(self.mean ** 2 + self.var - 1.0 - self.logvar, axis=(1, 2, 3))


class Encoder(nn.Module):
    """``conv_in -> DownEncoderBlock2D x n -> mid (resnet, attn, resnet) -> GN/SiLU/conv_out``."""

    out_channels: int = 4  # latent channels (doubled for mean + logvar)
    down_block_types: Sequence[str] = ("DownEncoderBlock2D",)
    block_out_channels: Sequence[int] = (64,)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    act_fn: str = "silu"
    double_z: bool = True
    mid_block_add_attention: bool = True
    remat: bool = False
    attention_implementation: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        common = dict(resnet_eps=1e-6, resnet_groups=self.norm_num_groups,
                      resnet_act_fn=self.act_fn, remat=self.remat,
                      attention_implementation=self.attention_implementation, **kw)
        boc = self.block_out_channels
        x = conv2d(boc[0], name="conv_in", **kw)(x.astype(self.dtype))
        for i, kind in enumerate(self.down_block_types):
            if kind != "DownEncoderBlock2D":
                raise InputError(f"unsupported VAE down block {kind!r}")
            x = DownEncoderBlock2D(out_channels=boc[i], num_layers=self.layers_per_block,
                                   add_downsample=i < len(boc) - 1, name=f"down_blocks_{i}",
                                   **common)(x)
        x = UNetMidBlock2D(out_channels=boc[-1], use_time_emb=False,
                           add_attention=self.mid_block_add_attention,
                           attention_head_dim=boc[-1], name="mid_block", **common)(x)
        x = group_norm(self.norm_num_groups, eps=1e-6, name="conv_norm_out",
                       param_dtype=self.param_dtype)(x)
        x = activation(self.act_fn)(x).astype(self.dtype)
        width = 2 * self.out_channels if self.double_z else self.out_channels
        return conv2d(width, name="conv_out", **kw)(x)


class Decoder(nn.Module):
    """``conv_in -> mid -> UpDecoderBlock2D x n -> GN/SiLU/conv_out``."""

    out_channels: int = 3
    up_block_types: Sequence[str] = ("UpDecoderBlock2D",)
    block_out_channels: Sequence[int] = (64,)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    act_fn: str = "silu"
    mid_block_add_attention: bool = True
    remat: bool = False
    attention_implementation: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        common = dict(resnet_eps=1e-6, resnet_groups=self.norm_num_groups,
                      resnet_act_fn=self.act_fn, remat=self.remat,
                      attention_implementation=self.attention_implementation, **kw)
        rev = tuple(reversed(self.block_out_channels))
        x = conv2d(rev[0], name="conv_in", **kw)(z.astype(self.dtype))
        x = UNetMidBlock2D(out_channels=rev[0], use_time_emb=False,
                           add_attention=self.mid_block_add_attention,
                           attention_head_dim=rev[0], name="mid_block", **common)(x)
        for i, kind in enumerate(self.up_block_types):
            if kind != "UpDecoderBlock2D":
                raise InputError(f"unsupported VAE up block {kind!r}")
            x = UpDecoderBlock2D(out_channels=rev[i], num_layers=self.layers_per_block + 1,
                                 add_upsample=i < len(rev) - 1, name=f"up_blocks_{i}",
                                 **common)(x)
        x = group_norm(self.norm_num_groups, eps=1e-6, name="conv_norm_out",
                       param_dtype=self.param_dtype)(x)
        x = activation(self.act_fn)(x).astype(self.dtype)
        return conv2d(self.out_channels, name="conv_out", **kw)(x)


class AutoencoderKL(nn.Module):
    """diffusers ``AutoencoderKL`` in Flax (see the module docstring).

    ``apply(v, x)`` runs encode -> (mode or sample) -> decode; use
    ``apply(v, x, method="encode")`` / ``apply(v, z, method="decode")`` for one half.
    """

    # ---- diffusers config ----
    in_channels: int = 3
    out_channels: int = 3
    down_block_types: Sequence[str] = ("DownEncoderBlock2D",)
    up_block_types: Sequence[str] = ("UpDecoderBlock2D",)
    block_out_channels: Sequence[int] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: Any = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: Sequence[float] | None = None
    latents_std: Sequence[float] | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    # ---- diffjax ----
    remat: bool = False
    attention_implementation: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **overrides) -> "AutoencoderKL":
        """Build from a diffusers ``config.json`` dict; ``overrides`` e.g. ``dtype=jnp.bfloat16``."""
        return _config.from_config(cls, config, **overrides)

    def to_config(self) -> dict:
        return _config.to_config(self)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def dummy_inputs(self) -> tuple[tuple, dict]:
        """The smallest valid ``(args, kwargs)`` for ``init`` / ``jax.eval_shape``."""
        f = self.downsample_factor
        return (jnp.zeros((1, f, f, self.in_channels), self.dtype),), {}

    def setup(self):
        if len(self.down_block_types) != len(self.block_out_channels) or \
                len(self.up_block_types) != len(self.block_out_channels):
            raise InputError("down_block_types, up_block_types and block_out_channels must have "
                             "the same length")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        shared = dict(block_out_channels=tuple(self.block_out_channels),
                      layers_per_block=self.layers_per_block,
                      norm_num_groups=self.norm_num_groups, act_fn=self.act_fn,
                      mid_block_add_attention=self.mid_block_add_attention, remat=self.remat,
                      attention_implementation=self.attention_implementation, **kw)
        self.encoder = Encoder(out_channels=self.latent_channels,
                               down_block_types=tuple(self.down_block_types), **shared)
        self.decoder = Decoder(out_channels=self.out_channels,
                               up_block_types=tuple(self.up_block_types), **shared)
        if self.use_quant_conv:
            self.quant_conv = conv2d(2 * self.latent_channels, kernel_size=1, **kw)
        if self.use_post_quant_conv:
            self.post_quant_conv = conv2d(self.latent_channels, kernel_size=1, **kw)

    def encode(self, x) -> DiagonalGaussian:
        """Image ``[B, H, W, in_channels]`` in [-1, 1] -> posterior over ``[B, H/f, W/f, C]``."""
        chex.assert_rank(x, 4)
        if x.shape[-1] != self.in_channels:
            raise InputError(f"image has {x.shape[-1]} channels, the VAE expects "
                             f"{self.in_channels} (NHWC layout)")
        f = self.downsample_factor
        if x.shape[1] % f or x.shape[2] % f:
            raise InputError(f"image size {x.shape[1]}x{x.shape[2]} is not a multiple of the "
                             f"VAE downsampling factor {f}; pad it first")
        h = self.encoder(x)
        if self.use_quant_conv:
            h = self.quant_conv(h)
        h = h.astype(jnp.float32)
        mean, logvar = jnp.split(h, 2, axis=-1)
        return DiagonalGaussian(mean=mean, logvar=jnp.clip(logvar, -30.0, 20.0))

    def decode(self, z):
        """Latents ``[B, h, w, latent_channels]`` (unscaled) -> image ``[B, h*f, w*f, out]``."""
        chex.assert_rank(z, 4)
        if z.shape[-1] != self.latent_channels:
            raise InputError(f"latents have {z.shape[-1]} channels, the VAE expects "
                             f"{self.latent_channels}")
        z = z.astype(self.dtype)
        if self.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def scale_latents(self, z):
        """Posterior latents -> diffusion-model latents: ``(z - shift) * scaling_factor``."""
        return (z - (self.shift_factor or 0.0)) * self.scaling_factor

    def unscale_latents(self, z):
        """Inverse of :meth:`scale_latents`."""
        return z / self.scaling_factor + (self.shift_factor or 0.0)

    def __call__(self, x, sample_posterior: bool = False, key=None):
        """Reconstruct ``x``: encode, take the posterior mode (or a sample with ``key``), decode."""
        posterior = self.encode(x)
        if sample_posterior:
            if key is None:
                raise InputError("sample_posterior=True needs a PRNG key")
            z = posterior.sample(key)
        else:
            z = posterior.mode()
        return self.decode(z)
