"""Video UNets, key-compatible with diffusers: ``UNet3DConditionModel`` and ``UNetMotionModel``.

* :class:`UNet3DConditionModel` - ModelScope text-to-video (Wang et al. 2023, "ModelScope
  Text-to-Video Technical Report"): the SD UNet with, in every layer, ``resnet -> temporal
  conv -> spatial transformer -> temporal transformer``, plus a temporal transformer
  ``transformer_in`` after ``conv_in``.
* :class:`UNetMotionModel` - AnimateDiff (Guo et al. 2024, "AnimateDiff: Animate Your
  Personalized Text-to-Image Diffusion Models without Specific Tuning", sec. 4): an SD 1.x
  UNet (all spatial weights and names unchanged) with a motion module (temporal
  transformer with sinusoidal frame positions) after every layer. Build it from a 2-D
  UNet config and a ``MotionAdapter`` config with :meth:`UNetMotionModel.from_unet2d`;
  :func:`merge_motion_params` puts converted 2-D UNet and adapter parameters together.

The call is the same for both (frames are folded into the batch inside; see
:mod:`diffjax.nn.video_blocks`)::

    out = module.apply({"params": p}, x, t, ctx)
    # x [B, F, H, W, C], t [B] (or scalar), ctx [B, S, D] (all frames) or [B, F, S, D]
    # -> [B, F, H, W, out_channels]

ControlNet residuals are accepted per frame (``[B, F, h, w, c]`` or folded ``[B * F, h, w,
c]``), as in the 2-D UNet. Fields mirror the diffusers ``config.json`` keys one to one.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import chex
import flax.linen as nn
import jax.numpy as jnp

from diffjax.errors import InputError
from diffjax.models import _config
from diffjax.nn.embeddings import TimestepEmbedding, timestep_embedding
from diffjax.nn.layers import activation, conv2d, group_norm
from diffjax.nn.temporal import TransformerTemporalModel, fold_frames, unfold_frames
from diffjax.nn.unet_blocks import UNetMidBlock2DCrossAttn
from diffjax.nn.video_blocks import VideoDownBlock, VideoMidBlock, VideoUpBlock

Dtype = Any
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


class _VideoUNet(nn.Module):
    """The forward pass shared by both video UNets; subclasses define the blocks."""

    def _check_common(self):
        if self.prediction_type not in PREDICTION_TYPES:
            raise InputError(f"prediction_type must be one of {PREDICTION_TYPES}, "
                             f"got {self.prediction_type!r}")
        n = len(self.down_block_types)
        if len(self.up_block_types) != n or len(self.block_out_channels) != n:
            raise InputError("down_block_types, up_block_types and block_out_channels must have "
                             "the same length")
        if self.norm_num_groups is None:
            raise InputError("norm_num_groups=None is not supported")
        if getattr(self, "time_cond_proj_dim", None) is not None:
            raise InputError("time_cond_proj_dim is not supported")

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **overrides):
        """Build from a diffusers ``config.json`` dict (``overrides``: dtype, remat, ...)."""
        module = _config.from_config(cls, config, **overrides)
        module.validate()
        return module

    def to_config(self) -> dict:
        return _config.to_config(self)

    @property
    def num_skips(self) -> int:
        """Skip tensors per frame (= ControlNet down residuals)."""
        layers = _config.per_block(self.layers_per_block, len(self.down_block_types),
                                   "layers_per_block")
        return 1 + sum(layers) + len(self.block_out_channels) - 1

    def dummy_inputs(self, num_frames: int = 2) -> tuple[tuple, dict]:
        """The smallest valid ``(args, kwargs)`` for ``init`` / ``jax.eval_shape``."""
        s = 2 ** (len(self.block_out_channels) - 1)
        return ((jnp.zeros((1, num_frames, s, s, self.in_channels), self.dtype),
                 jnp.zeros((1,), jnp.float32),
                 jnp.zeros((1, 1, self._cross_dim()), self.dtype)), {})

    def _cross_dim(self) -> int:
        dims = set(_config.per_block(self.cross_attention_dim, len(self.down_block_types),
                                     "cross_attention_dim"))
        if len(dims) != 1:
            raise InputError("different cross_attention_dim per block is not supported")
        return dims.pop()

    def _common_setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        boc = tuple(self.block_out_channels)
        self.conv_in = conv2d(boc[0], **kw)
        self.time_embedding = TimestepEmbedding(boc[0] * 4, act_fn=self.act_fn, **kw)
        self.conv_norm_out = group_norm(self.norm_num_groups, eps=self.norm_eps,
                                        param_dtype=self.param_dtype)
        self.conv_out = conv2d(self.out_channels, **kw)
        return dict(resnet_eps=self.norm_eps, resnet_groups=self.norm_num_groups,
                    resnet_act_fn=self.act_fn, remat=self.remat,
                    attention_implementation=self.attention_implementation, **kw)

    def _after_conv_in(self, h, num_frames, deterministic):
        return h

    def __call__(self, sample, timesteps, encoder_hidden_states, *,
                 down_block_additional_residuals: Sequence | None = None,
                 mid_block_additional_residual=None, deterministic: bool = True):
        """Predict noise / v / x0 for noisy video latents.

        Args:
          sample: ``[B, F, H, W, in_channels]``.
          timesteps: scalar or ``[B]`` (one timestep per clip).
          encoder_hidden_states: ``[B, S, D]`` shared by all frames, or ``[B, F, S, D]``.
          down_block_additional_residuals / mid_block_additional_residual: ControlNet
            outputs per frame, each ``[B, F, h, w, c]`` or ``[B * F, h, w, c]``.
        Returns:
          ``[B, F, H, W, out_channels]`` in ``dtype``.
        """
        chex.assert_rank(sample, 5)
        b, f, hgt, wid, cin = sample.shape
        if cin != self.in_channels:
            raise InputError(f"sample has {cin} channels, the UNet expects {self.in_channels} "
                             "(NTHWC layout)")
        ctx = jnp.asarray(encoder_hidden_states)
        if ctx.ndim == 3:
            ctx = jnp.repeat(ctx, f, axis=0)
        elif ctx.ndim == 4:
            if ctx.shape[1] != f:
                raise InputError(f"encoder_hidden_states has {ctx.shape[1]} frames, sample {f}")
            ctx = ctx.reshape((b * f,) + ctx.shape[2:])
        else:
            raise InputError("encoder_hidden_states must be [B, S, D] or [B, F, S, D], got "
                             f"shape {ctx.shape}")
        if ctx.shape[0] != b * f:
            raise InputError(f"encoder_hidden_states batch does not match the sample batch {b}")
        if ctx.shape[-1] != self._cross_dim():
            raise InputError(f"encoder_hidden_states has {ctx.shape[-1]} features, the UNet "
                             f"expects cross_attention_dim={self.cross_attention_dim}")
        ctx = ctx.astype(self.dtype)
        residuals = None
        if down_block_additional_residuals is not None:
            if len(down_block_additional_residuals) != self.num_skips:
                raise InputError(f"got {len(down_block_additional_residuals)} down-block "
                                 f"residuals, the UNet has {self.num_skips} skip connections")
            residuals = [fold_frames(r) if r.ndim == 5 else r
                         for r in down_block_additional_residuals]

        t = jnp.broadcast_to(jnp.ravel(jnp.asarray(timesteps, jnp.float32)), (b,))
        t_emb = timestep_embedding(t, self.block_out_channels[0], flip_sin_to_cos=True,
                                   freq_shift=0)
        emb = jnp.repeat(self.time_embedding(t_emb.astype(self.dtype)), f, axis=0)

        h = self.conv_in(fold_frames(sample.astype(self.dtype)))
        h = self._after_conv_in(h, f, deterministic)
        skips = (h,)
        for block in self.down_blocks:
            h, res = block(h, emb, ctx, None, f, deterministic)
            skips += res
        if residuals is not None:
            skips = tuple(s + r.astype(s.dtype) for s, r in zip(skips, residuals))
        if isinstance(self.mid_block, UNetMidBlock2DCrossAttn):
            h = self.mid_block(h, emb, ctx, None, deterministic)
        else:
            h = self.mid_block(h, emb, ctx, None, f, deterministic)
        if mid_block_additional_residual is not None:
            r = mid_block_additional_residual
            h = h + (fold_frames(r) if r.ndim == 5 else r).astype(h.dtype)

        factor = 2 ** (len(self.block_out_channels) - 1)
        forward_size = hgt % factor or wid % factor
        for i, block in enumerate(self.up_blocks):
            n_res = block.num_layers
            res, skips = skips[-n_res:], skips[:-n_res]
            size = skips[-1].shape[1:3] if (forward_size and i < len(self.up_blocks) - 1) else None
            h = block(h, res, emb, ctx, None, f, size, deterministic)
        h = activation(self.act_fn)(jnp.asarray(self.conv_norm_out(h))).astype(self.dtype)
        out = unfold_frames(self.conv_out(h), f)
        chex.assert_shape(out, (b, f, hgt, wid, self.out_channels))
        return out


class UNet3DConditionModel(_VideoUNet):
    """diffusers ``UNet3DConditionModel`` (ModelScope text-to-video) in Flax, NTHWC.

    Note diffusers' conventions: ``attention_head_dim`` is the width of each head
    (heads = channels // attention_head_dim) and ``transformer_in`` always has 8 heads of
    ``attention_head_dim``. All projections are linear (``use_linear_projection``).
    """

    sample_size: Any = None
    in_channels: int = 4
    out_channels: int = 4
    down_block_types: Sequence[str] = ("CrossAttnDownBlock3D", "CrossAttnDownBlock3D",
                                       "CrossAttnDownBlock3D", "DownBlock3D")
    up_block_types: Sequence[str] = ("UpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D",
                                     "CrossAttnUpBlock3D")
    block_out_channels: Sequence[int] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    act_fn: str = "silu"
    norm_num_groups: int | None = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 1024
    attention_head_dim: int | Sequence[int] = 64
    num_attention_heads: Any = None
    time_cond_proj_dim: int | None = None
    # ---- diffjax ----
    prediction_type: str = "epsilon"
    remat: bool = False
    attention_implementation: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def validate(self) -> None:
        self._check_common()
        if self.num_attention_heads is not None:
            raise InputError("UNet3DConditionModel: num_attention_heads must be None "
                             "(diffusers' convention: attention_head_dim sets the head width)")
        bad = [t for t in self.down_block_types if t not in ("DownBlock3D", "CrossAttnDownBlock3D")]
        bad += [t for t in self.up_block_types if t not in ("UpBlock3D", "CrossAttnUpBlock3D")]
        if bad:
            raise InputError(f"unsupported UNet3D block types: {bad}")

    def setup(self):
        self.validate()
        n = len(self.down_block_types)
        boc = tuple(self.block_out_channels)
        head_dims = _config.per_block(self.attention_head_dim, n, "attention_head_dim")
        common = self._common_setup()
        heads = lambda c, i: c // head_dims[i]  # noqa: E731
        self.transformer_in = TransformerTemporalModel(
            8, head_dims[0], norm_num_groups=self.norm_num_groups, remat=self.remat,
            attention_implementation=self.attention_implementation, dtype=self.dtype,
            param_dtype=self.param_dtype)
        video = dict(kind="3d", use_linear_projection=True, **common)
        self.down_blocks = [
            VideoDownBlock(out_channels=boc[i], num_layers=self.layers_per_block,
                           add_downsample=i < n - 1, downsample_padding=self.downsample_padding,
                           has_attention=kind == "CrossAttnDownBlock3D",
                           num_attention_heads=heads(boc[i], i),
                           temporal_heads=heads(boc[i], i), **video)
            for i, kind in enumerate(self.down_block_types)]
        self.mid_block = VideoMidBlock(
            out_channels=boc[-1], num_layers=1, output_scale_factor=self.mid_block_scale_factor,
            num_attention_heads=heads(boc[-1], n - 1), temporal_heads=heads(boc[-1], n - 1),
            **video)
        self.up_blocks = [
            VideoUpBlock(out_channels=boc[n - 1 - i], num_layers=self.layers_per_block + 1,
                         add_upsample=i < n - 1, has_attention=kind == "CrossAttnUpBlock3D",
                         num_attention_heads=heads(boc[n - 1 - i], n - 1 - i),
                         temporal_heads=heads(boc[n - 1 - i], n - 1 - i), **video)
            for i, kind in enumerate(self.up_block_types)]

    def _after_conv_in(self, h, num_frames, deterministic):
        return self.transformer_in(h, num_frames, deterministic)


# diffusers UNet2DConditionModel block names -> UNetMotionModel block names
_TO_MOTION = {"CrossAttnDownBlock2D": "CrossAttnDownBlockMotion", "DownBlock2D": "DownBlockMotion",
              "CrossAttnUpBlock2D": "CrossAttnUpBlockMotion", "UpBlock2D": "UpBlockMotion"}


class UNetMotionModel(_VideoUNet):
    """diffusers ``UNetMotionModel`` (AnimateDiff) in Flax, NTHWC.

    Spatial layers are those of the SD UNet (``num_attention_heads`` = heads per block,
    as diffusers copies SD's ``attention_head_dim`` there); motion modules have
    ``motion_num_attention_heads`` heads, sinusoidal positions up to
    ``motion_max_seq_length`` frames and zero-initialised outputs.
    """

    sample_size: Any = None
    in_channels: int = 4
    out_channels: int = 4
    down_block_types: Sequence[str] = ("CrossAttnDownBlockMotion", "CrossAttnDownBlockMotion",
                                       "CrossAttnDownBlockMotion", "DownBlockMotion")
    up_block_types: Sequence[str] = ("UpBlockMotion", "CrossAttnUpBlockMotion",
                                     "CrossAttnUpBlockMotion", "CrossAttnUpBlockMotion")
    block_out_channels: Sequence[int] = (320, 640, 1280, 1280)
    layers_per_block: int | Sequence[int] = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int | Sequence[int] = 1280
    transformer_layers_per_block: Any = 1
    reverse_transformer_layers_per_block: Any = None
    temporal_transformer_layers_per_block: Any = 1
    reverse_temporal_transformer_layers_per_block: Any = None
    transformer_layers_per_mid_block: Any = None
    temporal_transformer_layers_per_mid_block: Any = 1
    use_linear_projection: bool = False
    num_attention_heads: int | Sequence[int] = 8
    motion_max_seq_length: int = 32
    motion_num_attention_heads: int | Sequence[int] = 8
    reverse_motion_num_attention_heads: Any = None
    use_motion_mid_block: bool = True
    mid_block_layers: int = 1
    encoder_hid_dim: Any = None
    encoder_hid_dim_type: Any = None
    addition_embed_type: Any = None
    addition_time_embed_dim: Any = None
    projection_class_embeddings_input_dim: Any = None
    time_cond_proj_dim: int | None = None
    # ---- diffjax ----
    prediction_type: str = "epsilon"
    remat: bool = False
    attention_implementation: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def validate(self) -> None:
        self._check_common()
        for key in ("encoder_hid_dim", "encoder_hid_dim_type", "addition_embed_type"):
            if getattr(self, key) is not None:
                raise InputError(f"UNetMotionModel: {key}={getattr(self, key)!r} is not supported")
        bad = [t for t in self.down_block_types
               if t not in ("DownBlockMotion", "CrossAttnDownBlockMotion")]
        bad += [t for t in self.up_block_types if t not in ("UpBlockMotion", "CrossAttnUpBlockMotion")]
        if bad:
            raise InputError(f"unsupported UNetMotionModel block types: {bad}")
        for key in ("transformer_layers_per_block", "temporal_transformer_layers_per_block"):
            value = getattr(self, key)
            if not isinstance(value, int) and any(isinstance(v, (list, tuple)) for v in value) \
                    and getattr(self, "reverse_" + key) is None:
                raise InputError(f"per-layer {key} needs reverse_{key}")

    @classmethod
    def from_unet2d(cls, unet_config: Mapping[str, Any], adapter_config: Mapping[str, Any]
                    | None = None, **overrides) -> "UNetMotionModel":
        """The motion UNet for an SD ``UNet2DConditionModel`` config (+ a ``MotionAdapter``
        config), exactly as diffusers' ``UNetMotionModel.from_unet2d`` derives it."""
        cfg = {k: v for k, v in dict(unet_config).items() if not k.startswith("_")}
        n = len(cfg.get("down_block_types", cls.down_block_types))
        cfg["down_block_types"] = [_TO_MOTION.get(t, t) for t in cfg.get(
            "down_block_types", ("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",))]
        cfg["up_block_types"] = [_TO_MOTION.get(t, t) for t in cfg.get(
            "up_block_types", ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1))]
        if adapter_config is not None:
            a = {k: v for k, v in dict(adapter_config).items() if not k.startswith("_")}
            if a.get("conv_in_channels"):
                raise InputError("motion adapters with their own conv_in (conv_in_channels) "
                                 "are not supported")
            if len(a.get("block_out_channels", ())) != n:
                raise InputError("incompatible motion adapter: different number of blocks")
            ours = _config.per_block(cfg.get("layers_per_block", 2), n, "layers_per_block")
            theirs = _config.per_block(a.get("motion_layers_per_block", 2), n,
                                       "motion_layers_per_block")
            if tuple(ours) != tuple(theirs):
                raise InputError(f"incompatible motion adapter: {theirs} motion layers per "
                                 f"block, the UNet has {ours}")
            if tuple(a["block_out_channels"]) != tuple(cfg.get("block_out_channels", ())):
                raise InputError(f"incompatible motion adapter: block_out_channels "
                                 f"{a['block_out_channels']} vs {cfg.get('block_out_channels')}")
            cfg.update(
                motion_num_attention_heads=a.get("motion_num_attention_heads", 8),
                motion_max_seq_length=a.get("motion_max_seq_length", 32),
                use_motion_mid_block=a.get("use_motion_mid_block", True),
                layers_per_block=a.get("motion_layers_per_block", 2),
                temporal_transformer_layers_per_mid_block=a.get(
                    "motion_transformer_layers_per_mid_block", 1),
                temporal_transformer_layers_per_block=a.get(
                    "motion_transformer_layers_per_block", 1))
        if not cfg.get("num_attention_heads"):
            cfg["num_attention_heads"] = cfg.get("attention_head_dim", 8)
        known = set(_config.config_fields(cls))
        for key in ("dual_cross_attention", "class_embed_type", "num_class_embeds",
                    "time_embedding_type", "attention_type", "class_embeddings_concat",
                    "cross_attention_norm", "resnet_time_scale_shift", "resnet_skip_time_act",
                    "time_embedding_dim", "time_embedding_act_fn", "timestep_post_act",
                    "conv_in_kernel", "conv_out_kernel", "mid_block_type", "only_cross_attention",
                    "mid_block_only_cross_attention", "upcast_attention", "dropout"):
            value = cfg.pop(key, None)
            if value not in (None, False, "default", "positional", 3, 1.0,
                             "UNetMidBlock2DCrossAttn"):
                raise InputError(f"UNetMotionModel.from_unet2d: {key}={value!r} is not supported")
        cfg.pop("center_input_sample", None)
        cfg.pop("flip_sin_to_cos", None)
        cfg.pop("freq_shift", None)
        cfg.pop("resnet_out_scale_factor", None)
        cfg.pop("addition_embed_type_num_heads", None)
        cfg.pop("attention_head_dim", None)
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise InputError(f"UNetMotionModel.from_unet2d: unsupported UNet config keys {unknown}")
        return cls.from_config(cfg, **overrides)

    def setup(self):
        self.validate()
        n = len(self.down_block_types)
        boc = tuple(self.block_out_channels)
        heads = _config.per_block(self.num_attention_heads, n, "num_attention_heads")
        layers = _config.per_block(self.layers_per_block, n, "layers_per_block")
        tl = _config.per_block(self.transformer_layers_per_block, n, "transformer_layers_per_block")
        ttl = _config.per_block(self.temporal_transformer_layers_per_block, n,
                                "temporal_transformer_layers_per_block")
        mheads = _config.per_block(self.motion_num_attention_heads, n, "motion_num_attention_heads")
        rtl = (tuple(reversed(tl)) if self.reverse_transformer_layers_per_block is None else
               _config.per_block(self.reverse_transformer_layers_per_block, n,
                                 "reverse_transformer_layers_per_block"))
        rttl = (tuple(reversed(ttl)) if self.reverse_temporal_transformer_layers_per_block is None
                else _config.per_block(self.reverse_temporal_transformer_layers_per_block, n,
                                       "reverse_temporal_transformer_layers_per_block"))
        common = self._common_setup()
        video = dict(kind="motion", use_linear_projection=self.use_linear_projection,
                     max_seq_length=self.motion_max_seq_length, **common)
        self.down_blocks = [
            VideoDownBlock(out_channels=boc[i], num_layers=layers[i], add_downsample=i < n - 1,
                           downsample_padding=self.downsample_padding,
                           has_attention=kind == "CrossAttnDownBlockMotion",
                           num_attention_heads=heads[i], transformer_layers=tl[i],
                           temporal_heads=mheads[i], temporal_layers=ttl[i], **video)
            for i, kind in enumerate(self.down_block_types)]
        mid_tl = self.transformer_layers_per_mid_block
        if mid_tl is None:
            mid_tl = tl[-1] if isinstance(tl[-1], int) else 1
        mid = dict(out_channels=boc[-1], num_layers=self.mid_block_layers,
                   output_scale_factor=self.mid_block_scale_factor,
                   num_attention_heads=heads[-1], transformer_layers=mid_tl)
        if self.use_motion_mid_block:
            self.mid_block = VideoMidBlock(
                temporal_heads=mheads[-1],
                temporal_layers=self.temporal_transformer_layers_per_mid_block, **mid, **video)
        else:
            self.mid_block = UNetMidBlock2DCrossAttn(
                use_linear_projection=self.use_linear_projection, **mid, **common)
        self.up_blocks = [
            VideoUpBlock(out_channels=boc[n - 1 - i], num_layers=layers[n - 1 - i] + 1,
                         add_upsample=i < n - 1, has_attention=kind == "CrossAttnUpBlockMotion",
                         num_attention_heads=heads[n - 1 - i], transformer_layers=rtl[i],
                         temporal_heads=mheads[n - 1 - i], temporal_layers=rttl[i], **video)
            for i, kind in enumerate(self.up_block_types)]

    def unet2d_config(self) -> dict:
        """The config of the SD ``UNet2DConditionModel`` whose spatial layers this UNet has."""
        to_2d = {v: k for k, v in _TO_MOTION.items()}
        return dict(
            in_channels=self.in_channels, out_channels=self.out_channels,
            down_block_types=[to_2d[t] for t in self.down_block_types],
            up_block_types=[to_2d[t] for t in self.up_block_types],
            block_out_channels=list(self.block_out_channels),
            layers_per_block=_config.thaw(self.layers_per_block),
            downsample_padding=self.downsample_padding,
            mid_block_scale_factor=self.mid_block_scale_factor, act_fn=self.act_fn,
            norm_num_groups=self.norm_num_groups, norm_eps=self.norm_eps,
            cross_attention_dim=_config.thaw(self.cross_attention_dim),
            transformer_layers_per_block=_config.thaw(self.transformer_layers_per_block),
            attention_head_dim=_config.thaw(self.num_attention_heads),
            use_linear_projection=self.use_linear_projection,
            prediction_type=self.prediction_type, sample_size=self.sample_size)


def is_temporal_path(path: str) -> bool:
    """Whether a ``/``-joined parameter path belongs to a temporal layer (what a motion
    fine-tune trains: ``train_only=[TEMPORAL_PATTERN]``)."""
    import re

    return re.search(TEMPORAL_PATTERN, path) is not None


# Regex over parameter paths of the temporal layers of both video UNets.
TEMPORAL_PATTERN = r"(^|/)(motion_modules_\d+|temp_convs_\d+|temp_attentions_\d+|transformer_in)/"


def merge_motion_params(unet2d_params: Mapping, adapter_params: Mapping) -> dict:
    """The :class:`UNetMotionModel` params from SD UNet params and motion adapter params.

    Both are nested dicts as converted (adapter keys ``down_blocks_i/motion_modules_j/...``,
    ``mid_block/motion_modules_j``, ``up_blocks_i/motion_modules_j``); the spatial
    parameters are the 2-D UNet's unchanged. A key present in both is an error.
    """
    def merge(a, b, path):
        out = dict(a)
        for k, v in b.items():
            if k in out:
                if not (isinstance(out[k], Mapping) and isinstance(v, Mapping)):
                    raise InputError(f"motion adapter and UNet both have {path + k}")
                out[k] = merge(out[k], v, path + k + "/")
            else:
                out[k] = v
        return out

    return merge(dict(unet2d_params), dict(adapter_params), "")
