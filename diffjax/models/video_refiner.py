"""The residual video refiner (Brenig & Timofte, "Higher fidelity perceptual image and video
compression with a latent conditioned residual denoising diffusion model", the video part).

The poster turns its image codec into a video codec in four steps: a video codec replaces
the encoder-decoder backbone, the previous frame joins the diffusion UNet's input for
temporal consistency, training starts from pretrained checkpoints, and decoding takes 10
steps. :class:`ResidualVideoModel` is that network:

* **backbone** ``"x265"`` / ``"x264"``: a frozen video codec run by ffmpeg outside the
  network (:mod:`diffjax.codecs.residual_video`); the model holds only the refiner, which
  also sees the CRF as a constant map (``crf / 51``);
* **backbone** ``"learned"``: the project's gained mean-scale hyperprior coding every frame
  (the base of :class:`~diffjax.models.refiner.ResidualCodecModel`, same parameter names),
  and the refiner is conditioned on its decoded latent and quality as in the image codec.

The **refiner** is the image refiner's UNet (:func:`~diffjax.models.refiner.run_refiner_unet`,
the shared SD blocks behind a space-to-depth stem) denoising the scaled residual
``r = s · (x − x̂_backbone)`` with x0-prediction; its input is the concatenation::

    [ s2d(r_t) | s2d(2 x̂_backbone − 1) | condition | s2d(2 x̂_prev − 1) ]
      3p²        3p²                    E            3p² (absent with prev_frame=False)

where ``condition`` is the latent + one-hot quality (``learned``, the image refiner's
layout) or the CRF map (ffmpeg backbones), and ``x̂_prev`` is the previous *refined*
frame (the backbone frame itself for the first frame). Every parameter but the input rows
of ``refiner/unet/conv_in/kernel`` has the image refiner's name and shape, so
:func:`from_image_params` starts a video model from a trained image model (the shipped
``diffjax/weights/residual``): the shared rows are copied, the new ones (the previous frame,
the CRF map) start at zero, so at initialisation the video refiner is the image refiner.
"""
from __future__ import annotations

from typing import Any, Mapping

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from diffjax.entropy.models import DEFAULT_SCALE_TABLE
from diffjax.errors import CheckpointError, InputError
from diffjax.models.hyperprior import HyperpriorModel
from diffjax.models.refiner import (_gain_init, gained_base_pass, latent_condition,
                                    run_refiner_unet, space_to_depth)

Dtype = Any
FFMPEG_BACKBONES = ("x265", "x264")
BACKBONES = FFMPEG_BACKBONES + ("learned",)
MAX_CRF = 51


class VideoRefiner(nn.Module):
    """``(r_t, timesteps, x_base, prev, cond) -> r̂₀`` (see the module docstring).

    ``r_t, x_base, prev``: ``[B, H, W, 3]`` (``prev`` ``None`` without previous-frame
    conditioning); ``cond``: ``[B, H/p, W/p, E]`` condition maps (``E`` may be 0).
    """

    block_out_channels: tuple = (32, 64)
    layers_per_block: int = 1
    norm_num_groups: int = 8
    patch: int = 4
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, r_t, timesteps, x_base, prev, cond):
        b, h, w, _ = r_t.shape
        p = self.patch
        chex.assert_shape([r_t, x_base], (b, h, w, 3))
        chex.assert_shape(cond, (b, h // p, w // p, None))
        parts = [space_to_depth(r_t.astype(jnp.float32), p),
                 space_to_depth(x_base.astype(jnp.float32) * 2.0 - 1.0, p),
                 cond.astype(jnp.float32)]
        if prev is not None:
            chex.assert_shape(prev, (b, h, w, 3))
            parts.append(space_to_depth(prev.astype(jnp.float32) * 2.0 - 1.0, p))
        return run_refiner_unet(self, jnp.concatenate(parts, axis=-1), timesteps, (b, h, w))


class ResidualVideoModel(nn.Module):
    """Backbone-conditioned residual refiner for video (see the module docstring).

    :meth:`denoise` is the refiner; :meth:`base_pass` runs the learned backbone
    (``backbone="learned"`` only). Parameters: ``{"refiner": {"unet": ...}}``, plus
    ``"base"``, ``"gain"``, ``"inv_gain"`` for the learned backbone.
    """

    backbone: str = "x265"
    prev_frame: bool = True
    N: int = 64
    M: int = 96
    num_qualities: int = 5
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
        if self.backbone not in BACKBONES:
            raise InputError(f"backbone must be one of {', '.join(BACKBONES)}, got "
                             f"{self.backbone!r}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if self.learned:
            self.base = HyperpriorModel(N=self.N, M=self.M, mean_scale=True,
                                        scale_table=tuple(self.scale_table),
                                        train_quantization=self.train_quantization, **kw)
            init = _gain_init(self.num_qualities)
            shape = (self.num_qualities, self.M)
            self.gain = self.param("gain", init, shape, self.param_dtype)
            self.inv_gain = self.param("inv_gain", lambda k, s, d: init(k, s, d, inverse=True),
                                       shape, self.param_dtype)
        self.refiner = VideoRefiner(tuple(self.refiner_channels), self.refiner_layers,
                                    self.refiner_groups, self.patch, **kw)

    @property
    def learned(self) -> bool:
        return self.backbone == "learned"

    @property
    def multiple(self) -> int:
        """Frame sides are padded to multiples of this before refinement."""
        return 64 if self.learned else self.patch * 2 ** (len(self.refiner_channels) - 1)

    def __call__(self, x, quality, crf):
        """Initialisation: ``x [B, H, W, 3]`` (H, W multiples of :attr:`multiple`)."""
        b = x.shape[0]
        y_cond = None
        if self.learned:
            out = self.base_pass(x, quality, train=False)
            x, y_cond = out["x_base"], out["y_cond"]
        prev = x if self.prev_frame else None
        return self.denoise(jnp.zeros_like(x), jnp.zeros((b,)), x, prev, y_cond, quality, crf)

    def base_pass(self, x, quality, *, train: bool) -> dict:
        """The learned backbone: :func:`~diffjax.models.refiner.gained_base_pass`."""
        q = jnp.asarray(quality, jnp.int32).reshape(x.shape[0])
        return gained_base_pass(self, x, q, train=train)

    def condition(self, b: int, h: int, w: int, y_cond, quality, crf) -> jax.Array:
        """The condition maps ``[B, H/p, W/p, E]``: latent + quality, or the CRF map."""
        p = self.patch
        if self.learned:
            return latent_condition(y_cond, quality, self.num_qualities, p)
        c = jnp.asarray(crf, jnp.float32).reshape(b) / MAX_CRF
        return jnp.broadcast_to(c[:, None, None, None], (b, h // p, w // p, 1))

    def denoise(self, r_t, timesteps, x_base, prev, y_cond, quality, crf) -> jax.Array:
        """The refiner's x0 estimate of the scaled residual ``[B, H, W, 3]``; ``prev`` is
        ignored (may be ``None``) without previous-frame conditioning."""
        b, h, w, _ = r_t.shape
        cond = self.condition(b, h, w, y_cond, quality, crf)
        return self.refiner(r_t, timesteps, x_base, prev if self.prev_frame else None, cond)

    def config(self) -> dict:
        """The JSON-able constructor arguments (saved in ``model.json``)."""
        out = {"backbone": self.backbone, "prev_frame": bool(self.prev_frame),
               "refiner_channels": list(self.refiner_channels),
               "refiner_layers": self.refiner_layers, "refiner_groups": self.refiner_groups,
               "patch": self.patch, "residual_scale": float(self.residual_scale)}
        if self.learned:
            out.update(N=self.N, M=self.M, num_qualities=self.num_qualities)
        return out


def from_image_params(video_params: Mapping[str, Any], image_params: Mapping[str, Any],
                      model: ResidualVideoModel) -> dict:
    """``video_params`` with every parameter the image model has (a
    :class:`~diffjax.models.refiner.ResidualCodecModel` tree, e.g. the shipped
    ``diffjax/weights/residual``) copied in: the refiner UNet, and the base and gains for
    the learned backbone. ``conv_in``'s input rows of ``r_t`` and the backbone frame (and,
    for the learned backbone, the latent and quality rows) are copied; the rows of the
    previous frame and of the CRF map are zero, so the new inputs start switched off.
    Any other mismatch (widths, ``patch``, ``M``, qualities) is a ``CheckpointError``.
    Works on numpy or jax arrays, also under tracing (a task's ``init_params``); returns
    unboxed parameters."""
    from diffjax.train.checkpoint import check_same_structure

    video, image = dict(nn.meta.unbox(video_params)), dict(image_params)  # boxed from init
    if "refiner" not in image or "unet" not in image["refiner"]:
        raise CheckpointError("not residual image codec parameters (no refiner/unet)")
    v_unet, i_unet = dict(video["refiner"]["unet"]), dict(image["refiner"]["unet"])
    v_in, i_in = v_unet.pop("conv_in"), dict(i_unet.pop("conv_in"))
    check_same_structure(i_unet, v_unet, "the image refiner UNet (all but conv_in)")
    p2 = 3 * model.patch ** 2
    kept = 2 * p2 + (model.M + model.num_qualities if model.learned else 0)
    k_img, k_vid = i_in["kernel"], v_in["kernel"]
    if model.learned and k_img.shape[-2] != kept:
        raise CheckpointError(f"image conv_in takes {k_img.shape[-2]} channels; a learned "
                              f"backbone with M={model.M}, {model.num_qualities} qualities "
                              f"needs {kept}")
    if k_img.shape[:2] != k_vid.shape[:2] or k_img.shape[-1] != k_vid.shape[-1] \
            or k_img.shape[-2] < 2 * p2 or i_in["bias"].shape != v_in["bias"].shape:
        raise CheckpointError(f"image conv_in {k_img.shape} does not fit the video refiner's "
                              f"{k_vid.shape} (other widths or patch)")
    kernel = jnp.concatenate([jnp.asarray(k_img[..., :kept, :], k_vid.dtype),
                              jnp.zeros_like(k_vid[..., kept:, :])], axis=-2)
    out = dict(video)
    out["refiner"] = {"unet": {**i_unet, "conv_in": {"kernel": kernel, "bias": i_in["bias"]}}}
    if model.learned:
        for key in ("base", "gain", "inv_gain"):
            check_same_structure(image[key], video[key], f"the image model's {key}")
            out[key] = image[key]
    return jax.tree.map(lambda a, ref: jnp.asarray(a, ref.dtype), out, video)
