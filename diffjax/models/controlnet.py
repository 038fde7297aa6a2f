"""ControlNet (Zhang, Rao & Agrawala 2023, "Adding Conditional Control to Text-to-Image
Diffusion Models", ICCV), key-compatible with diffusers ``ControlNetModel``. NHWC.

A ControlNet is a trainable copy of the encoder half of a Stable Diffusion UNet (paper
sec. 3.2, fig. 3): ``conv_in``, ``time_embedding`` (+ SDXL ``add_embedding``),
``down_blocks`` and ``mid_block`` with the UNet's own names, so the copy can be
initialised from the UNet (:func:`from_unet`). A condition image ``c`` (``[B, 8H, 8W, 3]``
in ``[0, 1]`` for an SD latent ``[B, H, W, 4]``) is encoded by the small
``controlnet_cond_embedding`` network (sec. 3.3: convs with stride 2 down to the latent
size, a zero-initialised ``conv_out``) and added to ``conv_in(x)``. Every skip tensor of the
copy and the mid-block output go through one *zero convolution* (a 1x1 conv initialised at
zero, ``controlnet_down_blocks_i`` / ``controlnet_mid_block``; eq. 2-3), scaled by
``conditioning_scale`` and returned as the residuals the UNet adds to its skips and to its
mid block (:class:`~diffjax.models.unet.UNet2DConditionModel`,
``down_block_additional_residuals`` / ``mid_block_additional_residual``). At
initialisation the residuals are exactly zero, so the guided UNet equals the plain one
(the paper's "no harmful noise" argument, sec. 3.2).

Guess mode (the paper's "classifier-free guidance resolution weighting", sec. 4.1) scales
the residuals from 0.1 (shallowest) to 1.0 (mid) on a log scale, as diffusers does;
``global_pool_conditions`` averages each residual spatially (the "shuffle" ControlNets).

The encoder is built as a :class:`UNet2DConditionModel` whose scope is shared with the
ControlNet (``nn.share_scope``): its parameters sit at the top level under the UNet's
names, and the encoder code is the UNet's (``get_time_embedding``, ``forward_down``,
``forward_mid``), so the two cannot drift apart. The up path is never called and has no
parameters.

Also here:

* :class:`MultiControlNet` runs several ControlNets (one condition and scale each) and sums
  their residuals (diffusers ``MultiControlNetModel``);
* :func:`from_unet` initialises a ControlNet from a UNet's encoder (zero convs at zero),
  as diffusers' ``ControlNetModel.from_unet``;
* :func:`check_compatible` raises a clear error when a ControlNet's residuals cannot
  feed a given UNet;
* :func:`controlled_apply_fn` is a ``apply_fn(params, x_t, t, cond)`` for
  :func:`diffjax.diffusion.sample` / :func:`diffjax.diffusion.make_sampler` (the jitted,
  sharded loop) that runs the ControlNets and the UNet at every step;
* :func:`per_frame` folds video ``[B, T, ...]`` into the batch so one ControlNet guides
  every frame of a video UNet.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import chex
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffjax.errors import InputError
from diffjax.models import _config
from diffjax.models.unet import UNet2DConditionModel
from diffjax.nn.layers import CONV_AXES, conv2d

Dtype = Any

# Encoder fields shared with UNet2DConditionModel (same names, same meaning).
ENCODER_FIELDS = (
    "in_channels", "flip_sin_to_cos", "freq_shift", "down_block_types", "mid_block_type",
    "only_cross_attention", "block_out_channels", "layers_per_block", "downsample_padding",
    "mid_block_scale_factor", "act_fn", "norm_num_groups", "norm_eps", "cross_attention_dim",
    "transformer_layers_per_block", "encoder_hid_dim", "encoder_hid_dim_type",
    "attention_head_dim", "num_attention_heads", "use_linear_projection", "class_embed_type",
    "addition_embed_type", "addition_time_embed_dim", "num_class_embeds", "upcast_attention",
    "resnet_time_scale_shift", "projection_class_embeddings_input_dim",
    "addition_embed_type_num_heads")

_ZERO_INIT = nn.with_logical_partitioning(nn.initializers.zeros_init(), CONV_AXES)
_CONV_TEMPLATE = conv2d(1, dtype=jnp.float32, param_dtype=jnp.float32)  # unbound, for its conv


def _zero_conv(features: int, kernel_size: int, name: str | None, dtype, param_dtype) -> nn.Conv:
    """A conv initialised at zero (kernel and bias): the paper's "zero convolution".

    Same convolution as :func:`diffjax.nn.layers.conv2d` (padding, CPU fast path), only the
    kernel initialiser differs.
    """
    pad = (kernel_size - 1) // 2
    return nn.Conv(features, kernel_size=(kernel_size, kernel_size), strides=(1, 1),
                   padding=((pad, pad), (pad, pad)), dtype=dtype, param_dtype=param_dtype,
                   name=name, kernel_init=_ZERO_INIT,
                   conv_general_dilated_cls=_CONV_TEMPLATE.conv_general_dilated_cls)


class ControlNetConditioningEmbedding(nn.Module):
    """The condition encoder (paper sec. 3.3; diffusers ``ControlNetConditioningEmbedding``).

    ``conv_in -> silu -> (conv 3x3, silu, conv 3x3 stride 2, silu) per level -> conv_out``
    (zero-initialised). ``[B, f H, f W, C_cond] -> [B, H, W, conditioning_embedding_channels]``
    with ``f = 2 ** (len(block_out_channels) - 1)``.
    """

    conditioning_embedding_channels: int
    block_out_channels: Sequence[int] = (16, 32, 96, 256)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, cond):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        boc = tuple(self.block_out_channels)
        h = nn.silu(conv2d(boc[0], name="conv_in", **kw)(cond.astype(self.dtype)))
        for i in range(len(boc) - 1):
            h = nn.silu(conv2d(boc[i], name=f"blocks_{2 * i}", **kw)(h))
            h = nn.silu(conv2d(boc[i + 1], stride=2, name=f"blocks_{2 * i + 1}", **kw)(h))
        return _zero_conv(self.conditioning_embedding_channels, 3, "conv_out", **kw)(h)


class ControlNetModel(nn.Module):
    """diffusers ``ControlNetModel`` in Flax (see the module docstring).

    Call: ``apply({"params": p}, x [B, H, W, in], t (scalar or [B]), ctx [B, S, D],
    cond [B, f H, f W, conditioning_channels], conditioning_scale=1.0)`` ->
    ``(down_residuals, mid_residual)``: a tuple of ``num_skips`` arrays shaped like the
    UNet's skips, and one shaped like its mid-block output. ``f = 8`` for the default
    ``conditioning_embedding_out_channels`` (four levels).
    """

    # ---- diffusers config (names and defaults as diffusers 0.42) ----
    in_channels: int = 4
    conditioning_channels: int = 3
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: Sequence[str] = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                       "CrossAttnDownBlock2D", "DownBlock2D")
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    only_cross_attention: bool | Sequence[bool] = False
    block_out_channels: Sequence[int] = (320, 640, 1280, 1280)
    layers_per_block: int | Sequence[int] = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    act_fn: str = "silu"
    norm_num_groups: int | None = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 1280
    transformer_layers_per_block: Any = 1
    encoder_hid_dim: int | None = None
    encoder_hid_dim_type: str | None = None
    attention_head_dim: int | Sequence[int] = 8
    num_attention_heads: int | Sequence[int] | None = None
    use_linear_projection: bool = False
    class_embed_type: str | None = None
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    num_class_embeds: int | None = None
    upcast_attention: bool = False  # attention logits are always float32 in diffjax
    resnet_time_scale_shift: str = "default"
    projection_class_embeddings_input_dim: int | None = None
    controlnet_conditioning_channel_order: str = "rgb"
    conditioning_embedding_out_channels: Sequence[int] = (16, 32, 96, 256)
    global_pool_conditions: bool = False
    addition_embed_type_num_heads: int = 64
    # ---- diffjax ----
    remat: bool = False
    attention_implementation: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **overrides) -> "ControlNetModel":
        """Build from a diffusers ControlNet ``config.json`` dict (runtime ``overrides``)."""
        module = _config.from_config(cls, config, **overrides)
        module.validate()
        return module

    def to_config(self) -> dict:
        """JSON-able config (exactly diffusers' keys)."""
        return _config.to_config(self)

    # ------------------------------------------------------------------ structure
    def encoder_unet(self) -> UNet2DConditionModel:
        """An (unbound) UNet whose encoder half is this ControlNet's copy."""
        fields = {k: getattr(self, k) for k in ENCODER_FIELDS}
        up = tuple("CrossAttnUpBlock2D" if t == "CrossAttnDownBlock2D" else "UpBlock2D"
                   for t in reversed(tuple(self.down_block_types)))
        return UNet2DConditionModel(
            **fields, up_block_types=up, remat=self.remat,
            attention_implementation=self.attention_implementation, dtype=self.dtype,
            param_dtype=self.param_dtype, parent=None)

    def validate(self) -> None:
        """Raise :class:`InputError` for configs diffjax does not implement."""
        if self.controlnet_conditioning_channel_order not in ("rgb", "bgr"):
            raise InputError("controlnet_conditioning_channel_order must be 'rgb' or 'bgr', got "
                             f"{self.controlnet_conditioning_channel_order!r}")
        if not self.conditioning_embedding_out_channels:
            raise InputError("conditioning_embedding_out_channels must not be empty")
        if isinstance(self.cross_attention_dim, (list, tuple)):
            raise InputError("ControlNetModel: cross_attention_dim must be one int")
        self.encoder_unet().validate()

    @property
    def num_skips(self) -> int:
        """Number of down residuals (= the UNet's skip connections)."""
        return self.encoder_unet().num_skips

    @property
    def condition_factor(self) -> int:
        """Condition image size / latent size (8 for the released ControlNets)."""
        return 2 ** (len(self.conditioning_embedding_out_channels) - 1)

    def dummy_inputs(self) -> tuple[tuple, dict]:
        """The smallest valid ``(args, kwargs)`` for ``init`` / ``jax.eval_shape``."""
        (x, t, ctx), kwargs = self.encoder_unet().dummy_inputs()
        f = self.condition_factor
        cond = jnp.zeros((1, x.shape[1] * f, x.shape[2] * f, self.conditioning_channels),
                         self.dtype)
        return (x, t, ctx, cond), kwargs

    def setup(self):
        self.validate()
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.encoder = self.encoder_unet()
        nn.share_scope(self, self.encoder)  # encoder params at the top level, UNet names
        boc = tuple(self.block_out_channels)
        self.controlnet_cond_embedding = ControlNetConditioningEmbedding(
            boc[0], tuple(self.conditioning_embedding_out_channels), **kw)
        layers = _config.per_block(self.layers_per_block, len(boc), "layers_per_block")
        chans = [boc[0]]
        for i, c in enumerate(boc):
            chans += [c] * layers[i] + ([c] if i < len(boc) - 1 else [])
        self.controlnet_down_blocks = [_zero_conv(c, 1, None, **kw) for c in chans]
        self.controlnet_mid_block = _zero_conv(boc[-1], 1, None, **kw)

    # ------------------------------------------------------------------ forward
    def check_inputs(self, sample, controlnet_cond) -> None:
        """Shape checks with clear messages (static shapes, so free under jit)."""
        chex.assert_rank([sample, controlnet_cond], 4)
        if sample.shape[-1] != self.in_channels:
            raise InputError(f"sample has {sample.shape[-1]} channels, the ControlNet expects "
                             f"{self.in_channels} (NHWC layout)")
        if controlnet_cond.shape[-1] != self.conditioning_channels:
            raise InputError(f"condition image has {controlnet_cond.shape[-1]} channels, the "
                             f"ControlNet expects {self.conditioning_channels} (NHWC, values "
                             "in [0, 1])")
        f = self.condition_factor
        want = (sample.shape[1] * f, sample.shape[2] * f)
        if tuple(controlnet_cond.shape[1:3]) != want:
            raise InputError(f"condition image is {controlnet_cond.shape[1]}x"
                             f"{controlnet_cond.shape[2]}, the ControlNet needs {want[0]}x"
                             f"{want[1]} ({f}x the {sample.shape[1]}x{sample.shape[2]} latent)")
        if controlnet_cond.shape[0] != sample.shape[0]:
            raise InputError(f"condition batch {controlnet_cond.shape[0]} != sample batch "
                             f"{sample.shape[0]}")

    def __call__(self, sample, timesteps, encoder_hidden_states, controlnet_cond, *,
                 conditioning_scale=1.0, guess_mode: bool = False,
                 added_cond_kwargs: Mapping[str, Any] | None = None,
                 deterministic: bool = True):
        """Residuals for the UNet.

        Args:
          sample: ``[B, H, W, in_channels]`` noisy latents (the UNet's input).
          timesteps: scalar or ``[B]``.
          encoder_hidden_states: ``[B, S, cross_attention_dim]``.
          controlnet_cond: ``[B, f H, f W, conditioning_channels]`` condition image in
            ``[0, 1]`` (RGB; flipped to BGR when the config says so).
          conditioning_scale: multiplies every residual (may be a traced scalar).
          guess_mode: scale residuals 0.1 .. 1.0 log-spaced (shallow to mid).
          added_cond_kwargs: SDXL ``{"text_embeds", "time_ids"}``.
        Returns:
          ``(down_residuals, mid_residual)`` in ``dtype``.
        """
        self.check_inputs(sample, controlnet_cond)
        batch = sample.shape[0]
        context = jnp.asarray(encoder_hidden_states)
        chex.assert_rank(context, 3)
        if context.shape[-1] != self.cross_attention_dim or context.shape[0] != batch:
            raise InputError(f"encoder_hidden_states is {context.shape}, the ControlNet expects "
                             f"[{batch}, S, {self.cross_attention_dim}]")
        context = context.astype(self.dtype)
        cond = jnp.asarray(controlnet_cond)
        if self.controlnet_conditioning_channel_order == "bgr":
            cond = cond[..., ::-1]
        emb = self.encoder.get_time_embedding(timesteps, batch, added_cond_kwargs)
        h = self.encoder.conv_in(sample.astype(self.dtype))
        h = h + self.controlnet_cond_embedding(cond)
        h, skips = self.encoder.forward_down(h, emb, context, None, deterministic)
        h = self.encoder.forward_mid(h, emb, context, None, deterministic)
        down = [zc(s) for zc, s in zip(self.controlnet_down_blocks, skips)]
        mid = self.controlnet_mid_block(h)
        if guess_mode and not self.global_pool_conditions:
            scales = jnp.logspace(-1.0, 0.0, len(down) + 1, dtype=jnp.float32) * conditioning_scale
            down = [r * scales[i].astype(r.dtype) for i, r in enumerate(down)]
            mid = mid * scales[-1].astype(mid.dtype)
        else:
            scale = jnp.asarray(conditioning_scale, jnp.float32)
            down = [r * scale.astype(r.dtype) for r in down]
            mid = mid * scale.astype(mid.dtype)
        if self.global_pool_conditions:
            down = [jnp.mean(r, axis=(1, 2), keepdims=True) for r in down]
            mid = jnp.mean(mid, axis=(1, 2), keepdims=True)
        return tuple(down), mid


# ---------------------------------------------------------------------- helpers
def check_compatible(controlnet: ControlNetModel, unet: UNet2DConditionModel) -> None:
    """Raise :class:`InputError` unless ``controlnet``'s residuals fit ``unet``'s skips."""
    n = len(unet.down_block_types)
    problems = []
    if tuple(controlnet.block_out_channels) != tuple(unet.block_out_channels):
        problems.append(f"block_out_channels {tuple(controlnet.block_out_channels)} vs "
                        f"{tuple(unet.block_out_channels)}")
    elif (_config.per_block(controlnet.layers_per_block, n, "layers_per_block")
          != _config.per_block(unet.layers_per_block, n, "layers_per_block")):
        problems.append(f"layers_per_block {controlnet.layers_per_block} vs "
                        f"{unet.layers_per_block}")
    cross = set(_config.per_block(unet.cross_attention_dim, n, "cross_attention_dim"))
    if controlnet.cross_attention_dim not in cross:
        problems.append(f"cross_attention_dim {controlnet.cross_attention_dim} vs "
                        f"{unet.cross_attention_dim}")
    if (controlnet.mid_block_type is None) != (unet.mid_block_type is None):
        problems.append(f"mid_block_type {controlnet.mid_block_type} vs {unet.mid_block_type}")
    if controlnet.addition_embed_type != unet.addition_embed_type:
        problems.append(f"addition_embed_type {controlnet.addition_embed_type} vs "
                        f"{unet.addition_embed_type}")
    if problems:
        raise InputError("the ControlNet's encoder does not match the UNet: "
                         + "; ".join(problems))


def controlnet_for_unet(unet: UNet2DConditionModel, *,
                        conditioning_embedding_out_channels: Sequence[int] = (16, 32, 96, 256),
                        conditioning_channels: int = 3,
                        controlnet_conditioning_channel_order: str = "rgb",
                        **overrides) -> ControlNetModel:
    """The ControlNet module whose encoder copies ``unet``'s (the config half of
    :func:`from_unet`); ``overrides``: runtime fields (dtype, remat, ...)."""
    fields = {k: getattr(unet, k) for k in ENCODER_FIELDS}
    if isinstance(fields["cross_attention_dim"], (list, tuple)):
        fields["cross_attention_dim"] = fields["cross_attention_dim"][0]
    module = ControlNetModel(
        **fields, conditioning_embedding_out_channels=tuple(conditioning_embedding_out_channels),
        conditioning_channels=conditioning_channels,
        controlnet_conditioning_channel_order=controlnet_conditioning_channel_order,
        **{"remat": unet.remat, "attention_implementation": unet.attention_implementation,
           "dtype": unet.dtype, "param_dtype": unet.param_dtype, **overrides})
    module.validate()
    return module


def from_unet(unet: UNet2DConditionModel, unet_params, key: jax.Array, *,
              conditioning_embedding_out_channels: Sequence[int] = (16, 32, 96, 256),
              conditioning_channels: int = 3, controlnet_conditioning_channel_order: str = "rgb",
              load_weights_from_unet: bool = True, **overrides):
    """A ControlNet initialised from a UNet (diffusers ``ControlNetModel.from_unet``).

    The encoder copy (``conv_in``, ``time_embedding``, ``add_embedding``, ``down_blocks``,
    ``mid_block``) takes the UNet's parameters; the condition encoder is freshly initialised
    from ``key`` (its ``conv_out`` at zero) and every zero convolution is zero (paper
    sec. 3.2). Returns ``(module, params)``; ``params`` shares the UNet's arrays (no copy).
    Works on traced parameters too (inside ``jit`` / ``eval_shape``).
    """
    module = controlnet_for_unet(
        unet, conditioning_embedding_out_channels=conditioning_embedding_out_channels,
        conditioning_channels=conditioning_channels,
        controlnet_conditioning_channel_order=controlnet_conditioning_channel_order, **overrides)
    args, kwargs = module.dummy_inputs()
    if not load_weights_from_unet:
        params = jax.jit(lambda k: nn.meta.unbox(module.init(k, *args, **kwargs)["params"]))(key)
        return module, params
    unet_params = nn.meta.unbox(flax.core.unfreeze(unet_params))
    # Shapes only (tracing, no compilation): the encoder comes from the UNet, the zero convs
    # are zeros, and only the small condition encoder is initialised for real.
    abstract = jax.eval_shape(lambda: nn.meta.unbox(module.init(key, *args, **kwargs)["params"]))
    emb = ControlNetConditioningEmbedding(
        module.block_out_channels[0], tuple(module.conditioning_embedding_out_channels),
        dtype=module.dtype, param_dtype=module.param_dtype)
    params = {"controlnet_cond_embedding": _init_without_forward(
        emb, key, jnp.zeros(args[3].shape, module.dtype))}
    missing, mismatched = [], []
    for name, spec in abstract.items():
        if name.startswith("controlnet_down_blocks_") or name == "controlnet_mid_block":
            params[name] = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), spec)
            continue
        if name == "controlnet_cond_embedding":
            continue
        if name not in unet_params:
            missing.append(name)
            continue
        want = jax.tree.map(lambda a: tuple(a.shape), spec)
        got = jax.tree.map(lambda a: tuple(np.shape(a)), unet_params[name])
        if want != got:
            mismatched.append(name)
        params[name] = unet_params[name]
    if missing or mismatched:
        from diffjax.convert.mapping import CheckpointMismatchError

        raise CheckpointMismatchError("UNet parameters for ControlNet.from_unet",
                                      missing=missing, mismatched=mismatched)
    return module, params


def _init_without_forward(module: ControlNetConditioningEmbedding, key, example) -> dict:
    """The condition encoder's initial parameters from the shapes alone: LeCun-normal
    kernels (``N(0, 1 / fan_in)``), zero biases, zero ``conv_out``.

    Drawn on the host with numpy, seeded by ``key`` (through ``pure_callback`` when ``key``
    is traced): compiling ``init``'s convolutions or the threefry sampler costs minutes of
    XLA:CPU compile time on a busy machine for a few thousand numbers.
    """
    shapes = jax.eval_shape(lambda: nn.meta.unbox(module.init(key, example)["params"]))
    names = sorted(shapes)

    def draw(words):
        rng = np.random.default_rng(np.asarray(words, np.uint32).reshape(-1).tolist())
        out = []
        for name in names:
            kernel, bias = shapes[name]["kernel"], shapes[name]["bias"]
            fan_in = int(np.prod(kernel.shape[:-1]))
            w = rng.standard_normal(kernel.shape) / np.sqrt(fan_in)
            out.append(np.zeros(kernel.shape, kernel.dtype) if name == "conv_out"
                       else w.astype(kernel.dtype))
            out.append(np.zeros(bias.shape, bias.dtype))
        return out

    words = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    specs = [jax.ShapeDtypeStruct(shapes[n][leaf].shape, shapes[n][leaf].dtype)
             for n in names for leaf in ("kernel", "bias")]
    if isinstance(words, jax.core.Tracer):
        leaves = jax.pure_callback(draw, specs, words)
    else:
        leaves = [jnp.asarray(a) for a in draw(np.asarray(words))]
    return {n: {"kernel": leaves[2 * i], "bias": leaves[2 * i + 1]} for i, n in enumerate(names)}


def zero_residuals_like(controlnet: ControlNetModel, params) -> dict:
    """``params`` with every zero convolution (and the condition ``conv_out``) set to zero,
    i.e. the state of a fresh ControlNet (whose residuals are exactly zero)."""
    out = dict(params)
    for name in out:
        if name.startswith("controlnet_down_blocks_") or name == "controlnet_mid_block":
            out[name] = jax.tree.map(jnp.zeros_like, out[name])
    emb = dict(out["controlnet_cond_embedding"])
    emb["conv_out"] = jax.tree.map(jnp.zeros_like, emb["conv_out"])
    out["controlnet_cond_embedding"] = emb
    return out


@dataclasses.dataclass(frozen=True)
class MultiControlNet:
    """Several ControlNets at once (diffusers ``MultiControlNetModel``): residuals summed.

    ``apply(params_list, x, t, ctx, conds, scales)`` runs ControlNet ``i`` on ``conds[i]``
    with ``conditioning_scale=scales[i]`` and returns the element-wise sums.
    """

    nets: tuple[ControlNetModel, ...]

    def __post_init__(self):
        nets = tuple(self.nets)
        if not nets:
            raise InputError("MultiControlNet needs at least one ControlNet")
        skips = {n.num_skips for n in nets}
        if len(skips) != 1 or len({tuple(n.block_out_channels) for n in nets}) != 1:
            raise InputError("the ControlNets of a MultiControlNet must share one encoder "
                             "layout (block_out_channels, layers_per_block)")
        object.__setattr__(self, "nets", nets)

    def check_unet(self, unet: UNet2DConditionModel) -> None:
        for net in self.nets:
            check_compatible(net, unet)

    def apply(self, params_list: Sequence, sample, timesteps, encoder_hidden_states,
              conds: Sequence, scales: Sequence | float = 1.0, *, guess_mode: bool = False,
              added_cond_kwargs=None):
        if len(params_list) != len(self.nets) or len(conds) != len(self.nets):
            raise InputError(f"MultiControlNet of {len(self.nets)} nets got "
                             f"{len(params_list)} param trees and {len(conds)} conditions")
        if not isinstance(scales, (list, tuple)):
            scales = (scales,) * len(self.nets)
        if len(scales) != len(self.nets):
            raise InputError(f"{len(scales)} conditioning scales for {len(self.nets)} ControlNets")
        down, mid = None, None
        for net, p, cond, s in zip(self.nets, params_list, conds, scales):
            d, m = net.apply({"params": p}, sample, timesteps, encoder_hidden_states, cond,
                             conditioning_scale=s, guess_mode=guess_mode,
                             added_cond_kwargs=added_cond_kwargs)
            if down is None:
                down, mid = d, m
            else:
                down = tuple(a + b for a, b in zip(down, d))
                mid = mid + m
        return down, mid


def controlled_apply_fn(unet: UNet2DConditionModel, controlnets, *,
                        scales: Sequence[float] | float = 1.0, guess_mode: bool = False):
    """``apply_fn(params, x_t, t, cond)`` of a ControlNet-guided UNet, for the samplers.

    ``params = {"unet": unet_params, "controlnets": [p_1, ...]}``; ``cond = {"context":
    [B, S, D], "images": [c_1 [B, fH, fW, C], ...]}`` (+ ``"added_cond_kwargs"`` for SDXL).
    Every leaf of ``cond`` has a leading batch axis, so :class:`diffjax.diffusion.CFG`
    doubles it and :func:`diffjax.diffusion.make_sampler` shards it over the mesh's batch
    axes with the sample. Use it with ``sample(lambda x, t, c: fn(params, x, t, c), ...,
    cond=cond)`` or ``make_sampler(fn, ...)(params, x, cond=cond)``; a partial start
    (``start_step > 0``) denoises a partially noised latent.
    """
    nets = controlnets if isinstance(controlnets, MultiControlNet) else MultiControlNet(
        tuple(controlnets) if isinstance(controlnets, (list, tuple)) else (controlnets,))
    nets.check_unet(unet)

    def apply_fn(params, x_t, t, cond):
        if not isinstance(cond, Mapping) or "context" not in cond or "images" not in cond:
            raise InputError("cond must be {'context': [B, S, D], 'images': [c_1, ...]}")
        extra = cond.get("added_cond_kwargs")
        t_b = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x_t.shape[0],))
        down, mid = nets.apply(params["controlnets"], x_t, t_b, cond["context"],
                               list(cond["images"]), scales, guess_mode=guess_mode,
                               added_cond_kwargs=extra)
        return unet.apply({"params": params["unet"]}, x_t, t_b, cond["context"],
                          added_cond_kwargs=extra, down_block_additional_residuals=down,
                          mid_block_additional_residual=mid)

    return apply_fn


def per_frame(fn, *frame_arrays, repeat: Sequence = ()):
    """Run an image-level ``fn`` on every frame of a video (per-frame ControlNet guidance).

    Each of ``frame_arrays`` is ``[B, T, ...]`` (latents, condition frames) and is folded to
    ``[B * T, ...]``; each of ``repeat`` is ``[B, ...]`` (text context, added embeddings) and is
    repeated once per frame. ``fn(*folded, *repeated)``'s array outputs (tuples and lists
    too, e.g. ControlNet residuals) come back as ``[B, T, ...]``, ready for the per-frame
    skips of a video UNet.
    """
    if not frame_arrays:
        raise InputError("per_frame needs at least one [B, T, ...] array")
    frame_arrays = [jnp.asarray(a) for a in frame_arrays]
    b, t = frame_arrays[0].shape[:2]
    for a in frame_arrays:
        if a.ndim < 3 or a.shape[:2] != (b, t):
            raise InputError(f"per_frame: frame arrays must all be [{b}, {t}, ...], got {a.shape}")
    folded = [a.reshape((b * t,) + a.shape[2:]) for a in frame_arrays]

    def rep(a):
        a = jnp.asarray(a)
        if a.shape[:1] != (b,):
            raise InputError(f"per_frame: repeated arrays must be [{b}, ...], got {a.shape}")
        return jnp.repeat(a, t, axis=0)

    out = fn(*folded, *jax.tree.map(rep, tuple(repeat)))
    return jax.tree.map(lambda y: y.reshape((b, t) + y.shape[1:]), out)
