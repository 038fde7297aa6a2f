"""The video diffusion autoencoder codec (Rampas 2024, sec. 3.4.1), with real bitstreams.

The image codec (:mod:`diffjax.codecs.diffae`) extended along time, as the thesis does:

* **Encoder**: the image encoder (EfficientNetV2-S + 1x1 projection to 16 channels +
  affine-free BatchNorm, :class:`~diffjax.codecs.diffae.DiffAEEncoder`) on every frame, then
  the temporal compression of sec. 3.4.1 -- a 1x1x1 convolution and average pooling over
  ``f_t`` frames (``temporal_factor`` in 2, 4, 8;
  :class:`~diffjax.nn.blocks3d.TemporalCompress`): a clip is compressed 32x spatially and
  ``f_t`` x temporally.
* **Rates**: as the image codec, a quantisation step per quality and a factorized prior per
  (quality, channel); the decoder sees ``log2 Δ_q`` as an extra channel.
* **Decoder**: the learned deflate layers (:class:`~diffjax.nn.blocks3d.TemporalDeflate`)
  give one latent per frame back; it is nearest-upsampled to the first-stage grid and
  concatenated to the noisy first-stage latents of the frame group at the input of a
  3-D-convolution UNet with spatial-only stride (:class:`~diffjax.models.diffae_video.ConvUNet3D`),
  which denoises all frames of a group jointly. Cosine VP schedule, x0-prediction (or
  eps / v), DDPM with ``num_steps`` set at decode time, classifier-free guidance ``w``
  (Table 1's setup). The first stage (TAEF2, or an SD-compatible VAE) decodes the frames
  one by one (as a batch of frames).
* **Groups**: a clip is coded in groups of ``group_frames`` frames (a multiple of ``f_t``),
  each its own latent stream; the last group is padded by repeating the last frame and
  the decoder crops it back to the clip's frame count (which the header records), so any
  clip length round-trips. Decoding streams group by group (``decode_frames``).
* **Determinism**: the noise of group ``g`` derives from ``fold_in(seed, g)``; the 32-bit
  seed travels in the bitstream.

Bitstream (codec id 8, container version 2 with the frame rate): header quality = ``q``,
frames = ``T``; sections ``[meta = (seed uint32, group_frames uint16, f_t uint8), one latent
stream per group]``.

Params: ``{"encoder": {"params", "batch_stats"}, "temporal": {compress / deflate},
"entropy", "unet", "vae"}``.
"""
from __future__ import annotations

import json
import math
import struct
from typing import Any, Iterator, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffjax.codecs.base import VideoCodec, check_frames, crop, pad_to_multiple, register
from diffjax.codecs.diffae import (QUANT_STEPS, SCHEDULER, DiffAEEncoder, FirstStage,
                                   _check_steps, _DiffAEParams)
from diffjax.diffusion.parameterization import canonical_prediction_type
from diffjax.diffusion.samplers import make_plan
from diffjax.diffusion.sampling import CFG, run_plan
from diffjax.diffusion.schedules import DiscreteSchedule
from diffjax.entropy import bitstream, coder
from diffjax.entropy.bitstream import CorruptError
from diffjax.entropy.latent_coder import IdentityCache, check_symbols
from diffjax.entropy.models import EntropyBottleneck
from diffjax.errors import InputError
from diffjax.models.diffae_video import ConvUNet3D, VideoLatentCoder
from diffjax.nn.blocks3d import TEMPORAL_FACTORS
from diffjax.nn.layers import host_random_params

_META = struct.Struct("<IHB")  # seed, group_frames, f_t
MAX_GROUP = 64


@register("diffae-video")
class DiffAEVideoCodec(_DiffAEParams, VideoCodec):
    """Video diffusion autoencoder (see the module docstring).

        codec = diffjax.codecs.get("diffae-video", **codec_kwargs("smoke"))  # configs/diffae_video.py
        params = codec.init(jax.random.key(0))
        data = codec.encode(params, frames, fps=25)      # uint8 [T, H, W, 3]
        frames2 = codec.decode(params, data, num_steps=10)
    """

    name = "diffae-video"
    codec_id = 8
    param_groups = ("encoder", "temporal", "unet", "vae")

    def __init__(self, quality: int = 1, *, temporal_factor: int = 4,
                 group_frames: int | None = None, vae: str = "taesd",
                 vae_config: Mapping | None = None, unet_config: Mapping | None = None,
                 latent_channels: int = 16, encoder_width: float = 1.0,
                 encoder_depth: float = 1.0, quant_steps: Sequence[float] = QUANT_STEPS,
                 num_steps: int = 10, guidance_scale: float = 3.0, seed: int = 0,
                 prediction_type: str = "sample", dtype: Any = jnp.float32):
        if temporal_factor not in TEMPORAL_FACTORS:
            raise InputError(f"temporal_factor must be one of {TEMPORAL_FACTORS}, "
                             f"got {temporal_factor!r}")
        self.temporal_factor = int(temporal_factor)
        g = max(8, self.temporal_factor) if group_frames is None else group_frames
        if not (isinstance(g, (int, np.integer)) and 0 < g <= MAX_GROUP
                and g % self.temporal_factor == 0):
            raise InputError(f"group_frames must be a multiple of f_t={temporal_factor} in "
                             f"1..{MAX_GROUP}, got {group_frames!r}")
        self.group_frames = int(g)
        self._set_rates(quality, quant_steps)
        if vae_config is None or unet_config is None:
            raise InputError("the diffae-video codec needs vae_config and unet_config "
                             "(see experiments/configs/diffae_video.py)")
        self.quality, self.seed = int(quality), int(seed) & 0xFFFFFFFF
        self.num_steps, self.guidance_scale = _check_steps(num_steps), float(guidance_scale)
        self.latent_channels = int(latent_channels)
        self.prediction_type = canonical_prediction_type(prediction_type)
        self.first_stage = FirstStage(vae, vae_config, dtype)
        self.encoder = DiffAEEncoder(self.latent_channels, float(encoder_width),
                                     float(encoder_depth), dtype=dtype)
        self.temporal = VideoLatentCoder(self.latent_channels, self.temporal_factor, dtype=dtype)
        self.entropy = EntropyBottleneck(len(self.quant_steps) * self.latent_channels)
        unet_cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in unet_config.items()}
        self.unet = ConvUNet3D(out_channels=self.first_stage.channels, dtype=dtype, **unet_cfg)
        self.scheduler_config = dict(SCHEDULER, prediction_type=self.prediction_type)
        self.schedule = DiscreteSchedule.from_config(self.scheduler_config)
        self.up = 32 // self.first_stage.factor
        if self.up * self.first_stage.factor != 32:
            raise InputError(f"the first stage's factor {self.first_stage.factor} must divide 32")
        self.stride = math.lcm(32, self.first_stage.factor * 2 ** self.unet.num_upsamplers)
        self._config = json.dumps(["diffae-video", vae, dict(vae_config), unet_cfg,
                                   latent_channels, encoder_width, encoder_depth,
                                   self.temporal_factor, self.quant_steps,
                                   self.scheduler_config], sort_keys=True, default=str).encode()
        self._cache = IdentityCache()
        self._jitted: dict = {}

    # ----------------------------------------------------------------- parameters
    def param_shapes(self) -> dict:
        """``ShapeDtypeStruct`` trees of every part (traced, nothing computed)."""
        key = jax.random.key(0)
        enc = nn.unbox(jax.eval_shape(self.encoder.init, key, jnp.zeros((1, 32, 32, 3))))
        c, f = self.latent_channels, self.temporal_factor
        temporal = nn.unbox(jax.eval_shape(self.temporal.init, key,
                                           jnp.zeros((1, f, 1, 1, c))))["params"]
        x = jnp.zeros((1, 1, 8, 8, self.first_stage.channels + c + 1))
        unet = nn.unbox(jax.eval_shape(self.unet.init, key, x, jnp.zeros((1,))))["params"]
        return {"encoder": dict(enc), "temporal": temporal, "unet": unet,
                "vae": self.first_stage.param_shapes()}

    def init(self, rng: jax.Array) -> dict:
        """Host-drawn kernels (``N(0, 1/fan_in)``), the bottleneck's own initialisers, the
        first stage from its paths (else random)."""
        seed = int(np.asarray(jax.random.key_data(rng)).ravel()[-1])
        shapes = self.param_shapes()
        stats = jax.tree_util.tree_map_with_path(
            lambda p, a: np.full(a.shape, 1.0 if p[-1].key == "var" else 0.0, a.dtype),
            shapes["encoder"]["batch_stats"])
        entropy = nn.unbox(jax.jit(lambda k: self.entropy.init(
            k, jnp.zeros((1, self.entropy.channels)), train=False))(rng))["params"]
        return {"encoder": {"params": host_random_params(shapes["encoder"]["params"], seed + 1),
                            "batch_stats": stats},
                "temporal": host_random_params(shapes["temporal"], seed + 4),
                "entropy": jax.tree_util.tree_map(np.asarray, entropy),
                "unet": host_random_params(shapes["unet"], seed + 2),
                "vae": self.first_stage.load(seed + 3, shapes["vae"])}

    # ----------------------------------------------------------------- networks
    def latents(self, params, x01):
        """Frames ``[B, T, H, W, 3]`` in [0, 1] -> compressed latent ``[B, T/f_t, h, w, C]``
        (``train=True``: also the encoder's updated batch statistics)."""
        b, t = x01.shape[:2]
        y = self.encoder.apply(params["encoder"], x01.reshape((b * t,) + x01.shape[2:]))
        y = y.reshape((b, t) + y.shape[1:])
        return self.temporal.apply({"params": params["temporal"]}, y, method="compress")

    def condition(self, temporal_params, y_hat, log_step):
        """``ŷ [B, T/f_t, h, w, C]`` -> deflated, upsampled condition ``[B, T, H', W', C+1]``."""
        y = self.temporal.apply({"params": temporal_params}, y_hat, method="deflate")
        up = jnp.repeat(jnp.repeat(y, self.up, axis=2), self.up, axis=3)
        step = jnp.broadcast_to(jnp.reshape(log_step, (-1, 1, 1, 1, 1)), up.shape[:4] + (1,))
        return jnp.concatenate([up, step.astype(up.dtype)], axis=-1)

    def denoise(self, unet_params, z_t, timesteps, cond):
        """3-D UNet prediction (``prediction_type``) for the noisy group latents ``z_t``."""
        return self.unet.apply({"params": unet_params}, jnp.concatenate([z_t, cond], -1),
                               timesteps)

    def decode_first_stage(self, vae_params, z0):
        """First-stage latents ``[B, T, h, w, c]`` -> frames, decoded frame by frame."""
        b, t = z0.shape[:2]
        x = self.first_stage.decode(vae_params, z0.reshape((b * t,) + z0.shape[2:]))
        return x.reshape((b, t) + x.shape[1:])

    # the training loss's hooks (diffjax.codecs.diffae.diffae_loss on frame groups)
    def train_latents(self, params, x01, key):
        """``(compressed latent [B, T/f_t, h, w, C], new batch statistics)``."""
        b, t = x01.shape[:2]
        y, upd = self.encoder.apply(params["encoder"], x01.reshape((b * t,) + x01.shape[2:]),
                                    train=True, mutable=["batch_stats"], rngs={"dropout": key})
        y = y.reshape((b, t) + y.shape[1:])
        y = self.temporal.apply({"params": params["temporal"]}, y, method="compress")
        return y, upd["batch_stats"]

    def train_condition(self, params, y_tilde, log_step):
        return self.condition(params["temporal"], y_tilde, log_step)

    def target_latents(self, vae_params, x01):
        """First-stage latents of every frame ``[B, T, h', w', c]``."""
        b, t = x01.shape[:2]
        z = self.first_stage.encode(vae_params, x01.reshape((b * t,) + x01.shape[2:]))
        return z.reshape((b, t) + z.shape[1:])

    def _fn(self, name: str, num_steps: int = 0):
        key = (name, num_steps)
        if key not in self._jitted:
            if name == "analyze":
                def fn(params, x01, inv_step, medians):
                    return self.latents(params, x01) * inv_step - medians
            else:
                plan = make_plan(self.scheduler_config, "ddpm", num_steps)

                def fn(params, y_hat, log_step, seed, group, scale):
                    key = jax.random.fold_in(jax.random.key(seed), group)
                    k_init, k_steps = jax.random.split(key)
                    cond = self.condition(params["temporal"], y_hat, log_step)
                    z = jax.random.normal(k_init, cond.shape[:4] + (self.first_stage.channels,))
                    z0 = run_plan(plan, lambda x, t, c: self.denoise(params["unet"], x, t, c),
                                  z, key=k_steps, cond=cond,
                                  guidance=CFG(scale, jnp.zeros_like(cond)))
                    x = self.decode_first_stage(params["vae"], z0)
                    return jnp.round(jnp.clip(x, 0.0, 1.0) * 255.0).astype(jnp.uint8)
            self._jitted[key] = jax.jit(fn)
        return self._jitted[key]

    # ----------------------------------------------------------------- protocol
    def groups(self, frames: int) -> int:
        return -(-frames // self.group_frames)

    def encode(self, params: Any, frames: np.ndarray, fps: Any = None) -> bytes:
        """uint8 ``[T, H, W, 3]`` -> bitstream (groups of ``group_frames``, the last one
        padded with copies of the last frame)."""
        fingerprint, table, medians = self._prepared(params)
        frames = check_frames(frames)
        t, h, w = frames.shape[:3]
        g = self.group_frames
        x = pad_to_multiple(frames, self.stride)
        x = np.concatenate([x, np.repeat(x[-1:], self.groups(t) * g - t, axis=0)])
        q, step = self.quality, self.quant_steps[self.quality]
        rows = self.rows(q, (self.latent_channels,))
        streams = []
        for i in range(self.groups(t)):
            v = self._fn("analyze")(params, x[None, i * g:(i + 1) * g].astype(np.float32) / 255.0,
                                    np.float32(1.0 / step), medians[rows])
            symbols = check_symbols(np.asarray(v)[0])
            streams.append(coder.encode(symbols, self.rows(q, symbols.shape), table))
        meta = _META.pack(self.seed, g, self.temporal_factor)
        return bitstream.pack(self.codec_id, fingerprint, [meta, *streams], height=h, width=w,
                              frames=t, quality=q, fps=25 if fps is None else fps)

    def latent_shape(self, height: int, width: int, group_frames: int) -> tuple:
        s = self.stride
        return (group_frames // self.temporal_factor, -(-height // s) * s // 32,
                -(-width // s) * s // 32, self.latent_channels)

    def read(self, params: Any, data: bytes) -> dict:
        """Verify the container and decode every group's symbols (so a damaged file fails
        before any frame is produced): ``{"header", "seed", "group_frames", "y"}`` with
        ``y`` the dequantised latents, one ``[T/f_t, h, w, C]`` array per group."""
        fingerprint, table, medians = self._prepared(params)
        header, sections = bitstream.unpack(data, codec_id=self.codec_id,
                                            fingerprint=fingerprint)
        if header.channels != 3 or not sections or len(sections[0]) != _META.size:
            raise CorruptError("diffae-video bitstream has the wrong section layout")
        seed, g, f = _META.unpack(sections[0])
        if f != self.temporal_factor or not (0 < g <= MAX_GROUP) or g % f:
            raise CorruptError(f"diffae-video bitstream has f_t={f}, {g} frames per group; "
                               f"this model codes f_t={self.temporal_factor}")
        n = -(-header.frames // g)
        if len(sections) != 1 + n:
            raise CorruptError(f"diffae-video bitstream has {len(sections) - 1} frame groups, "
                               f"its {header.frames} frames need {n}")
        if header.quality not in self.qualities:
            raise CorruptError(f"diffae-video bitstream quality {header.quality} is not one "
                               f"of this model's {self.qualities}")
        q = header.quality
        shape = self.latent_shape(header.height, header.width, g)
        ys = []
        for i, stream in enumerate(sections[1:]):
            try:
                sym = coder.decode(stream, self.rows(q, shape), table)
            except CorruptError as err:
                raise CorruptError(f"diffae-video group {i} does not decode: {err}") from err
            ys.append(((sym + medians[self.rows(q, shape)]) * self.quant_steps[q])
                      .astype(np.float32))
        return dict(header=header, seed=seed, group_frames=g, y=ys)

    def decode_frames(self, params: Any, data: bytes, *, num_steps: int | None = None,
                      guidance_scale: float | None = None, steps: int | None = None
                      ) -> Iterator[np.ndarray]:
        """uint8 ``[H, W, 3]`` frames, one group at a time; ``num_steps`` (DDPM steps; the
        CLI's ``--steps`` is its alias ``steps``) and ``guidance_scale`` override the
        codec's defaults."""
        parts = self.read(params, data)  # everything checked before the first frame
        num_steps = num_steps if steps is None else steps
        k = self.num_steps if num_steps is None else _check_steps(num_steps)
        scale = self.guidance_scale if guidance_scale is None else float(guidance_scale)
        return self._frames(params, parts, k, scale)

    def decode(self, params: Any, data: bytes, *, num_steps: int | None = None,
               guidance_scale: float | None = None, steps: int | None = None) -> np.ndarray:
        """Bitstream -> uint8 ``[T, H, W, 3]`` (all of :meth:`decode_frames`)."""
        return np.stack(list(self.decode_frames(params, data, num_steps=num_steps,
                                                guidance_scale=guidance_scale, steps=steps)))

    def _frames(self, params, parts, k, scale):
        header, g = parts["header"], parts["group_frames"]
        log_step = np.full((1,), math.log2(self.quant_steps[header.quality]), np.float32)
        for i, y in enumerate(parts["y"]):
            x = np.asarray(self._fn("synthesize", k)(params, y[None], log_step,
                                                     np.uint32(parts["seed"]), np.uint32(i),
                                                     np.float32(scale)))[0]
            for frame in x[:min(g, header.frames - i * g)]:
                yield crop(frame, header.height, header.width)
