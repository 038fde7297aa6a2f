"""Stable-Diffusion-compatible conditional UNet (diffusers ``UNet2DConditionModel``), NHWC.

The denoiser of latent diffusion (Rombach et al. 2022, "High-Resolution Image Synthesis
with Latent Diffusion Models", sec. 3.3 and appendix E): a sinusoidal timestep embedding
(DDPM, Ho et al. 2020) -> ``conv_in`` -> down blocks (ResNet + cross-attention
transformers) -> mid block -> up blocks with skip connections -> GroupNorm/SiLU/``conv_out``.
The same module covers SD 1.x (1x1-conv projections, 768-d context), SD 2.x (linear
projections, 1024-d context, v- or eps-prediction) and SDXL (transformer depth per block,
"text_time" additional embeddings of pooled text embeddings and size/crop ids, Podell et
al. 2023, sec. 2.2).

Fields mirror diffusers' ``config.json`` one to one (same names and defaults), so
``UNet2DConditionModel.from_config(json.load(open("config.json")))`` builds the network
whose parameters a converted checkpoint fills key for key (``diffjax.convert``). Extra
diffjax fields: ``prediction_type`` (metadata for samplers: ``epsilon``, ``v_prediction``
or ``sample``), ``remat``, ``attention_implementation``, ``dtype``, ``param_dtype``.

The forward pass is also split into methods (:meth:`get_time_embedding`,
:meth:`forward_down`, :meth:`forward_mid`, :meth:`forward_up`) so ControlNet-style models
can reuse the encoder half, and it accepts ControlNet residuals.
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
from diffjax.nn.unet_blocks import (CrossAttnDownBlock2D, CrossAttnUpBlock2D, DownBlock2D,
                                    UNetMidBlock2D, UNetMidBlock2DCrossAttn, UpBlock2D)

Dtype = Any

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

# Config values diffjax does not implement (they are not used by SD 1.x/2.x/XL): key ->
# the only accepted value. Anything else raises a clear InputError.
_UNSUPPORTED_UNLESS = {
    "encoder_hid_dim": None, "encoder_hid_dim_type": None, "num_attention_heads": None,
    "dual_cross_attention": False, "class_embed_type": None, "num_class_embeds": None,
    "time_embedding_type": "positional", "time_cond_proj_dim": None,
    "attention_type": "default", "class_embeddings_concat": False,
    "cross_attention_norm": None, "resnet_out_scale_factor": 1.0,
}


class UNet2DConditionModel(nn.Module):
    """diffusers ``UNet2DConditionModel`` in Flax (see the module docstring).

    Call: ``apply({"params": p}, sample [B, H, W, in], timesteps [B] or scalar,
    encoder_hidden_states [B, S, cross_attention_dim])`` -> ``[B, H, W, out_channels]``.
    """

    # ---- diffusers config (names and defaults as diffusers 0.42) ----
    sample_size: Any = None
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: Sequence[str] = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                       "CrossAttnDownBlock2D", "DownBlock2D")
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    up_block_types: Sequence[str] = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                     "CrossAttnUpBlock2D")
    only_cross_attention: bool | Sequence[bool] = False
    block_out_channels: Sequence[int] = (320, 640, 1280, 1280)
    layers_per_block: int | Sequence[int] = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    dropout: float = 0.0
    act_fn: str = "silu"
    norm_num_groups: int | None = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int | Sequence[int] = 1280
    transformer_layers_per_block: Any = 1
    reverse_transformer_layers_per_block: Any = None
    encoder_hid_dim: int | None = None
    encoder_hid_dim_type: str | None = None
    attention_head_dim: int | Sequence[int] = 8
    num_attention_heads: int | Sequence[int] | None = None
    dual_cross_attention: bool = False
    use_linear_projection: bool = False
    class_embed_type: str | None = None
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    num_class_embeds: int | None = None
    upcast_attention: bool = False  # attention logits are always float32 in diffjax
    resnet_time_scale_shift: str = "default"
    resnet_skip_time_act: bool = False
    resnet_out_scale_factor: float = 1.0
    time_embedding_type: str = "positional"
    time_embedding_dim: int | None = None
    time_embedding_act_fn: str | None = None
    timestep_post_act: str | None = None
    time_cond_proj_dim: int | None = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    projection_class_embeddings_input_dim: int | None = None
    attention_type: str = "default"
    class_embeddings_concat: bool = False
    mid_block_only_cross_attention: bool | None = None
    cross_attention_norm: str | None = None
    addition_embed_type_num_heads: int = 64
    # ---- diffjax ----
    prediction_type: str = "epsilon"
    remat: bool = False
    attention_implementation: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **overrides) -> "UNet2DConditionModel":
        """Build from a diffusers ``config.json`` dict; ``overrides`` e.g. ``dtype=jnp.bfloat16``.

        Unsupported or inconsistent configs raise :class:`InputError` here already.
        """
        module = _config.from_config(cls, config, **overrides)
        module.validate()
        return module

    def to_config(self) -> dict:
        """JSON-able config (diffusers keys + ``prediction_type``)."""
        return _config.to_config(self)

    # ------------------------------------------------------------------ structure
    def validate(self) -> None:
        """Raise :class:`InputError` for configs diffjax does not implement."""
        for key, ok in _UNSUPPORTED_UNLESS.items():
            if getattr(self, key) != ok:
                raise InputError(f"UNet2DConditionModel: {key}={getattr(self, key)!r} is not "
                                 f"supported (only {ok!r})")
        if self.addition_embed_type not in (None, "text_time"):
            raise InputError(f"addition_embed_type={self.addition_embed_type!r} is not supported "
                             "(only None or 'text_time')")
        if self.addition_embed_type == "text_time" and (
                not self.addition_time_embed_dim or not self.projection_class_embeddings_input_dim):
            raise InputError("addition_embed_type='text_time' needs addition_time_embed_dim and "
                             "projection_class_embeddings_input_dim")
        if self.prediction_type not in PREDICTION_TYPES:
            raise InputError(f"prediction_type must be one of {PREDICTION_TYPES}, "
                             f"got {self.prediction_type!r}")
        n = len(self.down_block_types)
        if len(self.up_block_types) != n or len(self.block_out_channels) != n:
            raise InputError("down_block_types, up_block_types and block_out_channels must have "
                             "the same length")
        bad = [t for t in self.down_block_types if t not in ("DownBlock2D", "CrossAttnDownBlock2D")]
        bad += [t for t in self.up_block_types if t not in ("UpBlock2D", "CrossAttnUpBlock2D")]
        if self.mid_block_type not in ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D", None):
            bad.append(self.mid_block_type)
        if bad:
            raise InputError(f"unsupported UNet block types: {bad}")
        if len(set(_config.per_block(self.cross_attention_dim, n, "cross_attention_dim"))) != 1:
            raise InputError("different cross_attention_dim per block is not supported")
        if self.norm_num_groups is None:
            raise InputError("norm_num_groups=None is not supported")
        if (not isinstance(self.transformer_layers_per_block, int)
                and any(isinstance(t, (list, tuple)) for t in self.transformer_layers_per_block)
                and self.reverse_transformer_layers_per_block is None):
            raise InputError("per-layer transformer_layers_per_block needs "
                             "reverse_transformer_layers_per_block")

    @property
    def num_upsamplers(self) -> int:
        return len(self.block_out_channels) - 1

    @property
    def num_skips(self) -> int:
        """Number of skip tensors (= ControlNet down residuals): conv_in + every down layer
        + every downsampler."""
        layers = _config.per_block(self.layers_per_block, len(self.down_block_types),
                                   "layers_per_block")
        return 1 + sum(layers) + self.num_upsamplers

    def dummy_inputs(self) -> tuple[tuple, dict]:
        """The smallest valid ``(args, kwargs)`` for ``init`` / ``jax.eval_shape``."""
        s = 2 ** self.num_upsamplers
        cross = _config.per_block(self.cross_attention_dim, len(self.down_block_types),
                                  "cross_attention_dim")[0]
        args = (jnp.zeros((1, s, s, self.in_channels), self.dtype), jnp.zeros((1,), jnp.float32),
                jnp.zeros((1, 1, cross), self.dtype))
        kwargs = {}
        if self.addition_embed_type == "text_time":
            total, width = self.projection_class_embeddings_input_dim, self.addition_time_embed_dim
            n_ids = 6 if total > 6 * width else 1  # SDXL: 6 size/crop ids
            kwargs["added_cond_kwargs"] = {
                "text_embeds": jnp.zeros((1, total - n_ids * width), self.dtype),
                "time_ids": jnp.zeros((1, n_ids), jnp.float32)}
        return args, kwargs

    def setup(self):
        self.validate()
        n = len(self.down_block_types)
        boc = tuple(self.block_out_channels)
        # diffusers' naming bug: `attention_head_dim` holds the number of heads.
        heads = _config.per_block(self.attention_head_dim, n, "attention_head_dim")
        layers = _config.per_block(self.layers_per_block, n, "layers_per_block")
        tlayers = _config.per_block(self.transformer_layers_per_block, n,
                                    "transformer_layers_per_block")
        only_cross = _config.per_block(self.only_cross_attention, n, "only_cross_attention")
        _config.per_block(self.cross_attention_dim, n, "cross_attention_dim")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        time_embed_dim = self.time_embedding_dim or boc[0] * 4
        common = dict(resnet_eps=self.norm_eps, resnet_groups=self.norm_num_groups,
                      resnet_act_fn=self.act_fn, resnet_time_scale_shift=self.resnet_time_scale_shift,
                      resnet_skip_time_act=self.resnet_skip_time_act, dropout=self.dropout,
                      remat=self.remat, attention_implementation=self.attention_implementation, **kw)
        attn = dict(use_linear_projection=self.use_linear_projection)

        self.conv_in = conv2d(boc[0], kernel_size=self.conv_in_kernel, **kw)
        self.time_embedding = TimestepEmbedding(time_embed_dim, act_fn=self.act_fn,
                                                post_act_fn=self.timestep_post_act, **kw)
        if self.addition_embed_type == "text_time":
            self.add_embedding = TimestepEmbedding(time_embed_dim, **kw)

        down = []
        for i, kind in enumerate(self.down_block_types):
            args = dict(out_channels=boc[i], num_layers=layers[i], add_downsample=i < n - 1,
                        downsample_padding=self.downsample_padding, **common)
            if kind == "CrossAttnDownBlock2D":
                down.append(CrossAttnDownBlock2D(
                    num_attention_heads=heads[i], transformer_layers=tlayers[i],
                    only_cross_attention=only_cross[i], **attn, **args))
            else:
                down.append(DownBlock2D(**args))
        self.down_blocks = down

        mid_args = dict(out_channels=boc[-1], output_scale_factor=self.mid_block_scale_factor,
                        **common)
        if self.mid_block_type == "UNetMidBlock2DCrossAttn":
            self.mid_block = UNetMidBlock2DCrossAttn(
                num_layers=1, num_attention_heads=heads[-1], transformer_layers=tlayers[-1],
                **attn, **mid_args)
        elif self.mid_block_type == "UNetMidBlock2D":
            self.mid_block = UNetMidBlock2D(num_layers=0, add_attention=False, **mid_args)
        else:
            self.mid_block = None

        rev_tlayers = (tuple(reversed(tlayers)) if self.reverse_transformer_layers_per_block is None
                       else _config.per_block(self.reverse_transformer_layers_per_block, n,
                                              "reverse_transformer_layers_per_block"))
        up = []
        for i, kind in enumerate(self.up_block_types):
            j = n - 1 - i  # the matching down block
            args = dict(out_channels=boc[j], num_layers=layers[j] + 1, add_upsample=i < n - 1,
                        **common)
            if kind == "CrossAttnUpBlock2D":
                up.append(CrossAttnUpBlock2D(
                    num_attention_heads=heads[j], transformer_layers=rev_tlayers[i],
                    only_cross_attention=only_cross[j], **attn, **args))
            else:
                up.append(UpBlock2D(**args))
        self.up_blocks = up

        self.conv_norm_out = group_norm(self.norm_num_groups, eps=self.norm_eps,
                                        param_dtype=self.param_dtype)
        self.conv_out = conv2d(self.out_channels, kernel_size=self.conv_out_kernel, **kw)

    # ------------------------------------------------------------------ forward pieces
    def get_time_embedding(self, timesteps, batch_size: int,
                           added_cond_kwargs: Mapping[str, Any] | None = None):
        """Timestep (+ SDXL text/time) embedding ``[B, time_embed_dim]``.

        ``timesteps``: scalar, ``[1]`` or ``[B]`` (integer or fractional). For
        ``addition_embed_type="text_time"``, ``added_cond_kwargs`` holds ``text_embeds``
        ``[B, D]`` and ``time_ids`` ``[B, K]`` (SDXL: K = 6 size/crop numbers).
        """
        t = jnp.broadcast_to(jnp.ravel(jnp.asarray(timesteps, jnp.float32)), (batch_size,))
        t_emb = timestep_embedding(t, self.block_out_channels[0],
                                   flip_sin_to_cos=self.flip_sin_to_cos, freq_shift=self.freq_shift)
        emb = self.time_embedding(t_emb.astype(self.dtype))
        if self.addition_embed_type == "text_time":
            if not added_cond_kwargs or "text_embeds" not in added_cond_kwargs \
                    or "time_ids" not in added_cond_kwargs:
                raise InputError("this UNet (addition_embed_type='text_time') needs "
                                 "added_cond_kwargs={'text_embeds': [B, D], 'time_ids': [B, K]}")
            text_embeds = jnp.asarray(added_cond_kwargs["text_embeds"])
            time_ids = jnp.asarray(added_cond_kwargs["time_ids"])
            chex.assert_rank([text_embeds, time_ids], 2)
            time_embeds = timestep_embedding(
                time_ids.reshape(-1), self.addition_time_embed_dim,
                flip_sin_to_cos=self.flip_sin_to_cos, freq_shift=self.freq_shift)
            add = jnp.concatenate([text_embeds.astype(jnp.float32),
                                   time_embeds.reshape(batch_size, -1)], axis=-1)
            if add.shape[-1] != self.projection_class_embeddings_input_dim:
                raise InputError(f"text_embeds + time_ids embed to {add.shape[-1]} features, "
                                 f"expected {self.projection_class_embeddings_input_dim}")
            emb = emb + self.add_embedding(add.astype(self.dtype))
        if self.time_embedding_act_fn is not None:
            emb = activation(self.time_embedding_act_fn)(emb)
        return emb

    def forward_down(self, h, emb, context=None, context_bias=None, deterministic: bool = True):
        """Down path after ``conv_in``: returns ``(h, skips)`` with ``skips[0] = h`` (input)."""
        skips = (h,)
        for block in self.down_blocks:
            if isinstance(block, CrossAttnDownBlock2D):
                h, res = block(h, emb, context, context_bias, deterministic)
            else:
                h, res = block(h, emb, deterministic)
            skips += res
        return h, skips

    def forward_mid(self, h, emb, context=None, context_bias=None, deterministic: bool = True):
        """The mid block (identity when ``mid_block_type`` is None)."""
        if self.mid_block is None:
            return h
        if isinstance(self.mid_block, UNetMidBlock2DCrossAttn):
            return self.mid_block(h, emb, context, context_bias, deterministic)
        return self.mid_block(h, emb, deterministic)

    def forward_up(self, h, skips, emb, context=None, context_bias=None,
                   deterministic: bool = True):
        """Up path + output head; ``skips`` from :meth:`forward_down`."""
        factor = 2 ** self.num_upsamplers
        forward_size = any(d % factor for d in skips[0].shape[1:3])
        for i, block in enumerate(self.up_blocks):
            n_res = block.num_layers
            res, skips = skips[-n_res:], skips[:-n_res]
            size = skips[-1].shape[1:3] if (forward_size and i < len(self.up_blocks) - 1) else None
            if isinstance(block, CrossAttnUpBlock2D):
                h = block(h, res, emb, context, context_bias, size, deterministic)
            else:
                h = block(h, res, emb, size, deterministic)
        h = jnp.asarray(self.conv_norm_out(h))
        h = activation(self.act_fn)(h).astype(self.dtype)
        return self.conv_out(h)

    def __call__(self, sample, timesteps, encoder_hidden_states, *,
                 added_cond_kwargs: Mapping[str, Any] | None = None,
                 encoder_attention_mask=None,
                 down_block_additional_residuals: Sequence | None = None,
                 mid_block_additional_residual=None,
                 deterministic: bool = True):
        """Predict the noise / v / x0 (per ``prediction_type``) for a noisy latent.

        Args:
          sample: ``[B, H, W, in_channels]`` noisy latents.
          timesteps: scalar or ``[B]`` diffusion timesteps.
          encoder_hidden_states: ``[B, S, cross_attention_dim]`` text embeddings.
          added_cond_kwargs: SDXL ``{"text_embeds": [B, D], "time_ids": [B, K]}``.
          encoder_attention_mask: ``[B, S]``, 1 = attend, 0 = ignore (diffusers' -10000 bias).
          down_block_additional_residuals / mid_block_additional_residual: ControlNet
            outputs added to every skip / to the mid-block output.
        Returns:
          ``[B, H, W, out_channels]`` in ``dtype``.
        """
        chex.assert_rank(sample, 4)
        if down_block_additional_residuals is not None and \
                len(down_block_additional_residuals) != self.num_skips:
            raise InputError(f"got {len(down_block_additional_residuals)} down-block residuals, "
                             f"the UNet has {self.num_skips} skip connections")
        if sample.shape[-1] != self.in_channels:
            raise InputError(f"sample has {sample.shape[-1]} channels, the UNet expects "
                             f"{self.in_channels} (NHWC layout)")
        batch = sample.shape[0]
        context = jnp.asarray(encoder_hidden_states)
        chex.assert_rank(context, 3)
        cross_dims = set(_config.per_block(self.cross_attention_dim, len(self.down_block_types),
                                           "cross_attention_dim"))
        if context.shape[-1] not in cross_dims:
            raise InputError(f"encoder_hidden_states has {context.shape[-1]} features, the UNet "
                             f"expects cross_attention_dim={self.cross_attention_dim}")
        if context.shape[0] != batch:
            raise InputError(f"encoder_hidden_states batch {context.shape[0]} != sample batch {batch}")
        context = context.astype(self.dtype)
        context_bias = None
        if encoder_attention_mask is not None:
            mask = jnp.asarray(encoder_attention_mask, jnp.float32)
            chex.assert_shape(mask, (batch, context.shape[1]))
            context_bias = ((1.0 - mask) * -10000.0)[:, None, None, :]

        emb = self.get_time_embedding(timesteps, batch, added_cond_kwargs)
        h = sample.astype(self.dtype)
        if self.center_input_sample:
            h = 2 * h - 1.0
        h = self.conv_in(h)
        h, skips = self.forward_down(h, emb, context, context_bias, deterministic)
        if down_block_additional_residuals is not None:
            skips = tuple(s + r.astype(s.dtype)
                          for s, r in zip(skips, down_block_additional_residuals))
        h = self.forward_mid(h, emb, context, context_bias, deterministic)
        if mid_block_additional_residual is not None:
            h = h + mid_block_additional_residual.astype(h.dtype)
        out = self.forward_up(h, skips, emb, context, context_bias, deterministic)
        chex.assert_shape(out, (batch, *sample.shape[1:3], self.out_channels))
        return out
