"""Scale hyperprior and mean-scale hyperprior image compression models (Flax Linen).

* Scale hyperprior: Ballé, Minnen, Singh, Hwang & Johnston, "Variational image
  compression with a scale hyperprior", ICLR 2018 (fig. 4, the ``bmshj2018-hyperprior``
  of CompressAI): ``y = g_a(x)``, ``z = h_a(|y|)``, ``σ = h_s(ẑ)``, ``x̂ = g_s(ŷ)``.
* Mean-scale hyperprior: Minnen, Ballé & Toderici, "Joint autoregressive and hierarchical
  priors for learned image compression", NeurIPS 2018, without the autoregressive context
  (CompressAI ``mbt2018-mean``): ``z = h_a(y)``, ``(σ, μ) = h_s(ẑ)``.

Layers match CompressAI exactly (5x5 stride-2 convs with padding 2, transposed convs with
output padding 1, GDN/IGDN, ReLU or LeakyReLU(0.01) in the hyper networks), so trained
CompressAI weights port with :func:`params_from_compressai` and the tests compare every
output number for number. Images are NHWC floats in ``[0, 1]``; the total stride is 64.

Training (CompressAI-like)::

    model = HyperpriorModel(N=128, M=192, mean_scale=True)
    out = model.apply({"params": p}, x, train=True, rngs={"noise": key})
    loss, metrics = rate_distortion_loss(out, x, lmbda=0.0130)
    aux = model.apply({"params": p}, method="aux_loss")  # fits the bottleneck quantiles

``out = {"x_hat", "likelihoods": {"y", "z"}}``; ``diffjax.entropy.models.bits`` turns the
likelihoods into bits (``bpp = bits / num_pixels``). The aux loss only reaches the
``quantiles`` parameter, so it can simply be added to the main loss. The codec
(``diffjax.codecs.hyperprior``) builds the CDF tables from trained params once.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffjax.entropy.models import (
    DEFAULT_SCALE_TABLE,
    EntropyBottleneck,
    GaussianConditional,
    bits,
)
from diffjax.errors import CheckpointError, InputError
from diffjax.nn.conv_transpose import SubpixelConvTranspose
from diffjax.nn.gdn import GDN

Dtype = Any
STRIDE = 64  # g_a (16) times h_a (4)


def conv(features: int, kernel: int = 5, stride: int = 2, **kw) -> nn.Conv:
    """CompressAI ``conv``: k x k, stride s, padding k // 2 (kernel ``[k, k, in, out]``)."""
    p = kernel // 2
    return nn.Conv(features, (kernel, kernel), (stride, stride), padding=((p, p), (p, p)), **kw)


def deconv(features: int, kernel: int = 5, stride: int = 2, **kw) -> SubpixelConvTranspose:
    """CompressAI ``deconv``: ``ConvTranspose2d(k, s, padding=k//2, output_padding=s-1)``.

    The output is exactly ``s`` times the input size. As a convolution of the dilated
    input with the flipped kernel the padding is ``(k-1-k//2, k-1-k//2+s-1)``. Kernel
    ``[k, k, out, in]`` (Flax ``transpose_kernel``). Computed as a sub-pixel convolution
    (:mod:`diffjax.nn.conv_transpose`: same parameters and values as ``nn.ConvTranspose``,
    ~50x faster kernel gradients on XLA:CPU).
    """
    lo = kernel - 1 - kernel // 2
    hi = lo + stride - 1
    return SubpixelConvTranspose(features, (kernel, kernel), (stride, stride),
                                 padding=((lo, hi), (lo, hi)), **kw)


class _Stack(nn.Module):
    """A fixed sequence of (name, constructor) layers; names match the conversion table."""

    layers: tuple  # ((name, kind, kwargs), ...) with kind in conv/deconv/gdn/igdn/relu/lrelu
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for name, kind, args in self.layers:
            if kind == "conv":
                x = conv(**dict(args), **kw, name=name)(x)
            elif kind == "deconv":
                x = deconv(**dict(args), **kw, name=name)(x)
            elif kind in ("gdn", "igdn"):
                x = GDN(inverse=kind == "igdn", **kw, name=name)(x)
            elif kind == "relu":
                x = nn.relu(x)
            elif kind == "lrelu":
                x = nn.leaky_relu(x, 0.01)
        return x


def _layer_specs(n: int, m: int, mean_scale: bool) -> dict:
    """The four transforms as ``_Stack`` specs: ``{name: ((layer, kind, args), ...)}``."""
    c = lambda f, k=5, s=2: (("features", f), ("kernel", k), ("stride", s))  # noqa: E731
    g_a = (("conv0", "conv", c(n)), ("gdn0", "gdn", ()), ("conv1", "conv", c(n)),
           ("gdn1", "gdn", ()), ("conv2", "conv", c(n)), ("gdn2", "gdn", ()),
           ("conv3", "conv", c(m)))
    g_s = (("deconv0", "deconv", c(n)), ("igdn0", "igdn", ()), ("deconv1", "deconv", c(n)),
           ("igdn1", "igdn", ()), ("deconv2", "deconv", c(n)), ("igdn2", "igdn", ()),
           ("deconv3", "deconv", c(3)))
    act = "lrelu" if mean_scale else "relu"
    h_a = (("conv0", "conv", c(n, 3, 1)), ("act0", act, ()), ("conv1", "conv", c(n)),
           ("act1", act, ()), ("conv2", "conv", c(n)))
    if mean_scale:
        h_s = (("deconv0", "deconv", c(m)), ("act0", act, ()),
               ("deconv1", "deconv", c(m * 3 // 2)), ("act1", act, ()),
               ("conv2", "conv", c(2 * m, 3, 1)))
    else:
        h_s = (("deconv0", "deconv", c(n)), ("act0", act, ()), ("deconv1", "deconv", c(n)),
               ("act1", act, ()), ("conv2", "conv", c(m, 3, 1)), ("act2", act, ()))
    return {"g_a": g_a, "g_s": g_s, "h_a": h_a, "h_s": h_s}


class HyperpriorModel(nn.Module):
    """Scale (``mean_scale=False``) or mean-scale hyperprior; see the module docstring.

    Fields: ``N`` (hidden width), ``M`` (latent ``y`` channels), ``mean_scale``,
    ``scale_table`` (Gaussian conditional), ``train_quantization`` (``"noise"``,
    ``"ste"`` or ``"mixed"``; evaluation always rounds), ``eval_table_scales`` (evaluation
    rates with the coder's table scales, default; False gives CompressAI's continuous-scale
    evaluation), ``dtype``/``param_dtype``.
    """

    N: int = 128
    M: int = 192
    mean_scale: bool = False
    scale_table: tuple = DEFAULT_SCALE_TABLE
    train_quantization: str = "noise"
    eval_table_scales: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        specs = _layer_specs(self.N, self.M, self.mean_scale)
        self.g_a = _Stack(specs["g_a"], **kw)
        self.g_s = _Stack(specs["g_s"], **kw)
        self.h_a = _Stack(specs["h_a"], **kw)
        self.h_s = _Stack(specs["h_s"], **kw)
        self.entropy_bottleneck = EntropyBottleneck(self.N, **kw)
        self.gaussian_conditional = GaussianConditional(
            self.scale_table, eval_table_scales=self.eval_table_scales, dtype=self.dtype)

    # The pieces, for codecs and for models built on top (residual codec).
    def analysis(self, x: jax.Array) -> jax.Array:
        """``[B, H, W, 3]`` (H, W multiples of 16) -> ``y`` ``[B, H/16, W/16, M]``."""
        chex.assert_rank(x, 4)
        chex.assert_axis_dimension(x, -1, 3)
        return self.g_a(x)

    def hyper_analysis(self, y: jax.Array) -> jax.Array:
        """``y`` -> ``z`` ``[B, H/64, W/64, N]``."""
        return self.h_a(y if self.mean_scale else jnp.abs(y))

    def hyper_synthesis(self, z_hat: jax.Array) -> tuple[jax.Array, Optional[jax.Array]]:
        """``ẑ`` -> ``(scales, means)`` of ``y`` (``means`` is None for the scale model)."""
        params = self.h_s(z_hat)
        if self.mean_scale:
            scales, means = jnp.split(params, 2, axis=-1)
            return scales, means
        return params, None

    def synthesis(self, y_hat: jax.Array) -> jax.Array:
        """``ŷ`` ``[B, h, w, M]`` -> ``x̂`` ``[B, 16h, 16w, 3]`` (not clipped)."""
        chex.assert_axis_dimension(y_hat, -1, self.M)
        return self.g_s(y_hat)

    def z_medians(self) -> jax.Array:
        return self.entropy_bottleneck.medians()

    def table_indexes(self, scales: jax.Array) -> jax.Array:
        return self.gaussian_conditional.table_indexes(scales)

    def aux_loss(self) -> jax.Array:
        return self.entropy_bottleneck.aux_loss()

    def __call__(self, x: jax.Array, *, train: bool) -> dict:
        """``x`` ``[B, H, W, 3]`` in [0, 1], H and W multiples of 64.

        Returns ``{"x_hat", "likelihoods": {"y", "z"}}``; noise (training) comes from the
        ``"noise"`` RNG stream.
        """
        chex.assert_rank(x, 4)
        b, h, w, _ = x.shape
        if h % STRIDE or w % STRIDE:
            raise InputError(f"image size {h}x{w} is not a multiple of {STRIDE}; pad first "
                             f"(for training crops: data.crop must be a multiple of {STRIDE})")
        mode = self.train_quantization if train else "round"
        y = self.analysis(x)
        z = self.hyper_analysis(y)
        z_hat, z_lik = self.entropy_bottleneck(z, train=train, mode=mode)
        scales, means = self.hyper_synthesis(z_hat)
        y_hat, y_lik = self.gaussian_conditional(y, scales, means, train=train, mode=mode)
        x_hat = self.synthesis(y_hat)
        chex.assert_shape(x_hat, (b, h, w, 3))
        return {"x_hat": x_hat, "likelihoods": {"y": y_lik, "z": z_lik}}


def rate_distortion_loss(out: Mapping, x: jax.Array, lmbda: float):
    """CompressAI's ``RateDistortionLoss``: ``bpp + λ·255²·MSE`` (Ballé 2018, eq. 13).

    Returns ``(loss, {"bpp", "mse", "loss"})``; MSE on the [0, 1] scale, in float32.
    """
    b, h, w, _ = x.shape
    bpp = bits(out["likelihoods"]) / (b * h * w)
    mse = jnp.mean(jnp.square(out["x_hat"].astype(jnp.float32) - x.astype(jnp.float32)))
    loss = bpp + lmbda * 255.0**2 * mse
    return loss, {"bpp": bpp, "mse": mse, "loss": loss}


# --------------------------------------------------------------------------- porting
def _torch_layer(sd, key):
    """Conv ``[out, in, k, k]`` -> ``[k, k, in, out]``; transposed conv ``[in, out, k, k]``
    -> ``[k, k, out, in]`` (Flax ``transpose_kernel``): the same axis permutation."""
    return {"kernel": np.asarray(sd[f"{key}.weight"]).transpose(2, 3, 1, 0),
            "bias": np.asarray(sd[f"{key}.bias"])}


_EB_LISTS = {"matrix": "matrices", "bias": "biases", "factor": "factors"}


def _eb_param(sd, kind, i):
    """Bottleneck parameter ``i`` under CompressAI's current or pre-1.2 key names."""
    for key in (f"entropy_bottleneck.{_EB_LISTS[kind]}.{i}", f"entropy_bottleneck._{kind}{i}"):
        if key in sd:
            return sd[key]
    return None


def params_from_compressai(state_dict: Mapping[str, Any], *, mean_scale: bool) -> dict:
    """Port a CompressAI ``ScaleHyperprior``/``MeanScaleHyperprior`` state dict.

    Values may be torch tensors (``.numpy()``-able via ``np.asarray``) or arrays. Returns
    the ``"params"`` collection of :class:`HyperpriorModel` (``N``/``M`` are read from
    the shapes by the caller: ``N = g_a.0.weight.shape[0]``, ``M = g_a.6.weight.shape[0]``).
    Raises :class:`~diffjax.CheckpointError` on a missing key.
    """
    sd = {k: (v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v))
          for k, v in state_dict.items()}
    specs = _layer_specs(1, 1, mean_scale)
    try:
        # A layer's position in its spec is its index in CompressAI's nn.Sequential.
        params = {}
        for net, layers in specs.items():
            tree = {}
            for pos, (name, kind, _) in enumerate(layers):
                key = f"{net}.{pos}"
                if kind in ("conv", "deconv"):
                    tree[name] = _torch_layer(sd, key)
                elif kind in ("gdn", "igdn"):
                    tree[name] = {"beta": sd[f"{key}.beta"], "gamma": sd[f"{key}.gamma"].T}
            params[net] = tree
        eb, i = {}, 0
        while _eb_param(sd, "matrix", i) is not None:
            eb[f"matrix{i}"] = _eb_param(sd, "matrix", i)
            eb[f"bias{i}"] = _eb_param(sd, "bias", i)[..., 0]
            factor = _eb_param(sd, "factor", i)
            if factor is not None:
                eb[f"factor{i}"] = factor[..., 0]
            i += 1
        if i == 0:
            raise KeyError("entropy_bottleneck.matrices.0")
        eb["quantiles"] = sd["entropy_bottleneck.quantiles"][:, 0, :]
        params["entropy_bottleneck"] = eb
    except KeyError as err:
        raise CheckpointError(f"CompressAI state dict is missing {err}") from err
    return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), params)
