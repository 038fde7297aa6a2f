"""The hint-guided video codec (IKIN: Westcott & Vela, "Diffusion-Based Compression", IKIN
Inc.), codec id 5.

The codec transmits almost no pixels. Per clip it sends

1. a LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") of the
   frozen foundation UNet, fine-tuned on the clip's own frames with the hints as conditions
   (:mod:`diffjax.codecs.hint_lora`; optionally a "control-LoRA" per ControlNet), packed with
   :func:`diffjax.nn.lora.pack`;
2. per frame, weak *hints* -- canny edges, depth, low-resolution colour -- each one H.264 or
   H.265 stream at its own CRF and resolution (:mod:`diffjax.codecs.hint_guidance`);
3. the sampler settings and the seed, so that decoding is deterministic.

The receiver decodes the hint streams with ffmpeg, merges the LoRA into the base UNet and
reconstructs the clip in temporal windows of ``window`` frames in the first-stage latent
space (TAEF2 for the project's ``ldm_taef2`` model, or an SD VAE): the base UNet with an
AnimateDiff motion module (Guo et al. 2024, "AnimateDiff", sec. 4: temporal attention
between the frames of a window; :class:`~diffjax.models.unet3d.UNetMotionModel`), guided by
one ControlNet per hint (Zhang et al. 2023, "Adding Conditional Control to Text-to-Image
Diffusion Models"; residuals summed, one conditioning scale each, as diffusers'
``MultiControlNetModel``), DDIM (Song et al. 2021) from noise or, with ``strength < 1``,
from the upsampled colour hint noised to the start step (SDEdit, Meng et al. 2022). An
optional temporal median filter of the output (Table I: output median radius) follows.

**Settings** (constructor arguments; every one can be set on its own):

* presets :data:`PRESETS` ``"exp1"`` / ``"exp2"``: Table I's hint resolutions as fractions
  of the clip's (so they scale with it): colour at full resolution / 1/4 at CRF 51, canny
  and depth at 1/2 / 1/4; ``hints={"canny": {"crf": 45, "low": 50}, ...}`` overrides any
  field of any hint (``scale``, ``crf``, ``codec`` h264/h265, ``control_scale``, canny's
  ``low``/``high``, depth's ``median_radius``); ``hint_codec`` sets the codec of all;
* ``transmit``: the hints sent (default: the hints that have a ControlNet, plus colour when
  ``strength < 1``); ``depth_source``: see :mod:`~diffjax.codecs.hint_guidance` (or
  ``encode(..., depth=...)``); a depth hint without one is an ``InputError``;
* LoRA: ``lora_steps``, ``lora_rank``, ``lora_alpha``, ``lora_targets``, ``lora_lr``,
  ``lora_batch`` (frames per step), ``lora_bits`` (16 / 8 / 4, :mod:`diffjax.nn.lora_pack`),
  ``control_lora_rank`` (0 = no control-LoRA), ``control_lora_targets``;
* receiver: ``steps`` (DDIM steps), ``strength``, ``window``, ``output_median_radius``, ``seed``;
* ``fast_compile``: XLA's cheapest code generation (:data:`~diffjax.codecs.hint_lora.FAST_COMPILE`:
  2-3x faster compiles on CPU, slower steps; tests and smoke runs). Decoding is
  bit-identical across runs and processes for one model folder; other compile settings may
  differ from it in float rounding.

**Model** (``params``; the parts are inputs, so the real ones plug in later):
``{"vae": first stage, "unet": 2-D base UNet, "motion": motion-module parameters (when
``adapter_config`` is given), "controlnets": {hint: ControlNet params}, "context":
optional [1, S, D]}`` with ``unet_config`` (diffusers ``UNet2DConditionModel``),
``adapter_config`` (diffusers ``MotionAdapter``), ``controlnet_configs`` ({hint: diffusers
``ControlNetModel`` config}), ``vae`` / ``vae_config`` (``"taesd"`` + TAEF2's, or ``"sd"``)
and ``scheduler_config`` as constructor arguments (:class:`~diffjax.codecs.foundation.Backbone`
holds the first stage, the UNet and the schedule).

**Bitstream** (container version 2 with the frame count and rate; every byte counted):

* section 0, settings: :data:`_HEAD` (version, seed, DDIM steps, start step, window,
  output median radius, control-LoRA flag, number of hints) then per hint :data:`_HINT`
  (hint id, codec id, CRF, stream height and width, ControlNet scale as float16, CRC32 of
  the stream), then a CRC32 of the section (so each section checks itself: the LoRA has its
  own CRC, each stream its CRC here);
* section 1, the UNet LoRA (:func:`diffjax.nn.lora.pack`); then one control-LoRA section per
  ControlNet (sorted by hint name) when the flag is set;
* then one raw Annex-B stream per hint, in the order of the settings section.

Every section is verified before the first frame is produced: the LoRA must unpack and fit
the model (``WrongModelError`` otherwise), each stream must match its CRC32 and decode to
its geometry.
Window ``k``'s starting noise is ``normal(fold_in(fold_in(PRNGKey(0), seed), k))``; the
last window is edge-padded to ``window`` frames (one compiled shape) and cut back.
"""
from __future__ import annotations

import dataclasses
import json
import math
import struct
import time
import zlib
from typing import Any, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from diffjax.codecs import hint_guidance as G
from diffjax.codecs.base import (VideoCodec, check_frames, crop, fingerprint_pytree,
                                 pad_to_multiple, register)
from diffjax.entropy import bitstream
from diffjax.entropy.bitstream import CorruptError
from diffjax.entropy.latent_coder import IdentityCache
from diffjax.errors import BitstreamError, InputError
from diffjax.codecs.hint_lora import jit
from diffjax.nn import lora as L

FORMAT_VERSION = 1
HINT_IDS = {name: i for i, name in enumerate(G.HINTS)}
CODEC_IDS = {"h264": 0, "h265": 1}
_HEAD = struct.Struct("<BIBBBBBB")
_HINT = struct.Struct("<BBBHHeI")
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
# Table I (IKIN white paper) hint settings as fractions of the clip's resolution.
PRESETS = {
    "exp1": {"colour": {"scale": 1.0, "crf": 51}, "canny": {"scale": 0.5, "crf": 51},
             "depth": {"scale": 0.5, "crf": 51}},
    "exp2": {"colour": {"scale": 0.25, "crf": 51}, "canny": {"scale": 0.25, "crf": 51},
             "depth": {"scale": 0.25, "crf": 51}},
}
_HINT_DEFAULTS = {"canny": {"low": 100, "high": 200}, "depth": {"median_radius": 0}}


@dataclasses.dataclass
class Transmission:
    """What :meth:`HintCodec.transmit_clip` produced: the file and its parts (for tests and
    measurements). ``hints``: ``{name: {"stream", "crc", "pictures" (decoded), "size"}}``;
    ``lora``: the trained adapters ``{"lora", ["control_lora"]}``; ``sections``: the bytes of
    every section by name; ``seconds``: ``{"lora", "hints"}`` encode time."""

    data: bytes
    lora: dict
    hints: dict
    sections: dict
    losses: list
    seconds: dict


def _ints(name, value, lo, hi):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or \
            not lo <= value <= hi:
        raise InputError(f"{name} must be an integer from {lo} to {hi}, got {value!r}")
    return int(value)


@register("hint")
class HintCodec(VideoCodec):
    """The IKIN hint-guided video codec (module docstring)."""

    name = "hint"
    codec_id = 5

    def __init__(self, *, unet_config: Mapping, scheduler_config: Mapping, vae: str = "taesd",
                 vae_config: Mapping | None = None, adapter_config: Mapping | None = None,
                 controlnet_configs: Mapping[str, Mapping] | None = None,
                 preset: str = "exp1", hint_codec: str = "h264",
                 hints: Mapping[str, Mapping] | None = None, transmit: Sequence[str] | None = None,
                 depth_source: Any = None, lora_steps: int = 50, lora_rank: int = 4,
                 lora_alpha: float | None = None, lora_targets: Any = ATTENTION,
                 lora_lr: float = 1e-4, lora_batch: int = 2, lora_bits: int = 8,
                 control_lora_rank: int = 0, control_lora_targets: Any = ATTENTION,
                 steps: int = 20, strength: float = 1.0, window: int = 8,
                 output_median_radius: int = 0, seed: int = 0, fast_compile: bool = False):
        from diffjax.codecs.foundation import Backbone
        from diffjax.diffusion import DiscreteSchedule, sdedit_start_step
        from diffjax.models.controlnet import ControlNetModel, check_compatible
        from diffjax.models.unet3d import UNetMotionModel

        if preset not in PRESETS:
            raise InputError(f"preset must be one of {', '.join(PRESETS)}, got {preset!r}")
        self.backbone = Backbone(vae, dict(vae_config or {}), dict(unet_config),
                                 dict(scheduler_config))
        self.unet = self.backbone.unet
        self.motion = None if adapter_config is None else UNetMotionModel.from_unet2d(
            dict(unet_config), dict(adapter_config))
        self.controlnets = {}
        for name, cfg in sorted(dict(controlnet_configs or {}).items()):
            if name not in G.HINTS:
                raise InputError(f"ControlNet for unknown hint {name!r}; hints: {G.HINTS}")
            net = ControlNetModel.from_config(dict(cfg))
            check_compatible(net, self.unet)
            self.controlnets[name] = net
        self.steps = _ints("steps", steps, 1, 255)
        if not 0.0 < float(strength) <= 1.0:
            raise InputError(f"strength must be in (0, 1], got {strength}")
        self.strength = float(strength)
        self.start_step = 0 if self.strength == 1.0 else sdedit_start_step(self.steps,
                                                                           self.strength)
        max_window = self.motion.motion_max_seq_length if self.motion else 255
        self.window = _ints("window", window, 1, max_window)
        self.output_median_radius = _ints("output_median_radius", output_median_radius, 0, 32)
        self.seed = _ints("seed", seed, 0, 2 ** 32 - 1)
        # hint settings: defaults < preset < hint_codec < per-hint overrides
        overrides = {k: dict(v) for k, v in dict(hints or {}).items()}
        self.hint_settings = {}
        for name in G.HINTS:
            cfg = {"codec": hint_codec, "control_scale": 1.0, **_HINT_DEFAULTS.get(name, {}),
                   **PRESETS[preset][name], **overrides.pop(name, {})}
            cfg = G.check_hint_settings(name, cfg)
            cfg["control_scale"] = float(np.float16(cfg["control_scale"]))  # as the file has it
            self.hint_settings[name] = cfg
        if overrides:
            raise InputError(f"settings for unknown hint(s) {sorted(overrides)}")
        if transmit is None:
            transmit = sorted(set(self.controlnets) | ({"colour"} if self.start_step else set()))
        self.transmit = tuple(transmit)
        for name in self.transmit:
            if name not in G.HINTS:
                raise InputError(f"unknown hint {name!r} in transmit; hints: {G.HINTS}")
            if name not in self.controlnets and not (name == "colour" and self.start_step):
                raise InputError(f"hint {name!r} has no ControlNet and is not the colour start "
                                 "image: it would cost bits and guide nothing")
        if self.start_step and "colour" not in self.transmit:
            raise InputError("strength < 1 starts from the colour hint: transmit 'colour'")
        if len(set(self.transmit)) != len(self.transmit) or \
                2 + len(self.transmit) + len(self.controlnets) > bitstream.MAX_SECTIONS:
            raise InputError(f"bad hint list {self.transmit}")
        missing = set(self.controlnets) - set(self.transmit)
        if missing:
            raise InputError(f"ControlNets for {sorted(missing)} need their hints transmitted")
        self.depth_source = depth_source
        self.lora = dict(steps=_ints("lora_steps", lora_steps, 0, 1_000_000),
                         rank=_ints("lora_rank", lora_rank, 1, 1024), alpha=lora_alpha,
                         targets=list(lora_targets) if not isinstance(lora_targets, str)
                         else lora_targets, lr=float(lora_lr),
                         batch=_ints("lora_batch", lora_batch, 1, 4096),
                         bits=lora_bits, control_rank=_ints("control_lora_rank",
                                                             control_lora_rank, 0, 1024),
                         control_targets=list(control_lora_targets)
                         if not isinstance(control_lora_targets, str) else control_lora_targets)
        if lora_bits not in (16, 8, 4):
            raise InputError(f"lora_bits must be 16, 8 or 4, got {lora_bits!r}")
        self.schedule = DiscreteSchedule.from_config(self.backbone.scheduler_config)
        self.stride = self.backbone.vae_factor * 2 ** self.unet.num_upsamplers
        # the receiver's networks, spelled canonically (the same model gives the same
        # fingerprint however its configs were written)
        bb = self.backbone
        first = bb.vae.to_config() if vae == "sd" else dict(
            latent_channels=bb.latent_channels, arch_variant=bb.taesd[0].arch_variant,
            scaling_factor=bb.scaling_factor, shift_factor=bb.shift_factor)
        config = dict(vae=vae, first_stage=first, unet=self.unet.to_config(),
                      motion=self.motion.to_config() if self.motion else None,
                      scheduler=bb.scheduler_config,
                      controlnets={k: n.to_config() for k, n in self.controlnets.items()})
        self._config = ("hint/" + json.dumps(config, sort_keys=True, default=str)).encode()
        self.fast_compile = bool(fast_compile)
        self._cache = IdentityCache()
        self._sample_fns: dict = {}

    # ----------------------------------------------------------------- parameters
    def param_shapes(self) -> dict:
        """``ShapeDtypeStruct`` tree of the model parameters (module docstring)."""
        import flax.linen as nn

        from diffjax.models.unet3d import is_temporal_path
        from diffjax.train.optim import path_string

        key = jax.random.key(0)
        shapes = self.backbone.param_shapes()
        out = {"vae": shapes["vae"], "unet": shapes["unet"], "controlnets": {}}
        for name, net in self.controlnets.items():
            args, kw = net.dummy_inputs()
            out["controlnets"][name] = nn.unbox(jax.eval_shape(
                lambda: net.init(key, *args, **kw)["params"]))
        if self.motion is not None:
            args, kw = self.motion.dummy_inputs()
            full = nn.unbox(jax.eval_shape(lambda: self.motion.init(key, *args, **kw)["params"]))
            out["motion"] = _filter(full, lambda path: is_temporal_path(path_string(path)))
        return out

    def random_params(self, seed: int = 0) -> dict:
        """Random parameters drawn on the host (tests, smoke runs): kernels
        ``N(0, 1 / fan_in)``, so the zero convolutions and motion modules act."""
        from diffjax.nn.layers import host_random_params

        return host_random_params(self.param_shapes(), seed, jitter=0.02)

    def _prepared(self, params: Any) -> tuple:
        return self._cache.get(params, self._prepare)

    def _prepare(self, params: Any) -> tuple:
        need = {"vae", "unet", "controlnets"} | ({"motion"} if self.motion else set())
        if not isinstance(params, Mapping) or need - set(params) or \
                set(self.controlnets) - set(params["controlnets"]):
            raise InputError(f"hint params need {sorted(need)} and ControlNets for "
                             f"{sorted(self.controlnets)}")
        params = jax.tree.map(jnp.asarray, dict(params))
        used = {k: params[k] for k in ("vae", "unet", "motion", "context") if k in params}
        used["controlnets"] = {k: params["controlnets"][k] for k in self.controlnets}
        return used, fingerprint_pytree(used, self._config)

    def fingerprint(self, params: Any) -> bytes:
        return self._prepared(params)[1]

    # ----------------------------------------------------------------- conditions
    def _geometry(self, h: int, w: int) -> dict:
        ph, pw = h + (-h % self.stride), w + (-w % self.stride)
        lh, lw = ph // self.backbone.vae_factor, pw // self.backbone.vae_factor
        return {"padded": (ph, pw), "latent": (lh, lw)}

    def _conditions(self, pictures: Mapping[str, np.ndarray], h: int, w: int) -> dict:
        """Decoded hint pictures -> ControlNet conditions ``{hint: [T, fh, fw, 3]}`` (the
        frame's padded picture, edge-padded like the frames, at the ControlNet's size)."""
        geo = self._geometry(h, w)
        out = {}
        for name, net in self.controlnets.items():
            full = G.resize(pictures[name], h, w, "bicubic" if name == "colour" else "bilinear")
            full = pad_to_multiple(full, self.stride)
            f = net.condition_factor
            out[name] = G.condition_images(name, full, geo["latent"][0] * f, geo["latent"][1] * f)
        return out

    # ----------------------------------------------------------------- transmitter
    def encode(self, params: Any, frames: np.ndarray, fps: Any = None, depth: Any = None
               ) -> bytes:
        """uint8 ``[T, H, W, 3]`` -> bitstream (see :meth:`transmit`)."""
        return self.transmit_clip(params, frames, fps=fps, depth=depth).data

    def transmit_clip(self, params: Any, frames: np.ndarray, fps: Any = None,
                      depth: Any = None) -> Transmission:
        """Extract and code the hints, fine-tune the LoRA on them, pack the file."""
        from diffjax.codecs.hint_lora import HintLoraTask, finetune

        frames = check_frames(frames)
        used, fp = self._prepared(params)
        t, h, w = frames.shape[:3]
        fps = 25 if fps is None else fps
        depth = self.depth_source if depth is None else depth
        started = time.perf_counter()
        hints = {}
        for name in self.transmit:
            cfg = self.hint_settings[name]
            pictures = G.hint_pictures(name, frames, cfg, depth)
            size = G.stream_size(h, w, cfg["scale"])
            stream, crc, decoded = G.code_hint(pictures, size, cfg["codec"], cfg["crf"], fps)
            hints[name] = {"stream": stream, "crc": crc, "pictures": decoded, "size": size}
        hint_seconds = time.perf_counter() - started
        started = time.perf_counter()
        conds = self._conditions({k: v["pictures"] for k, v in hints.items()}, h, w)
        latents = self._encode_latents(used["vae"], pad_to_multiple(frames, self.stride))
        task = HintLoraTask(
            self.unet, used["unet"],
            {k: (net, used["controlnets"][k]) for k, net in self.controlnets.items()},
            {k: self.hint_settings[k]["control_scale"] for k in self.controlnets},
            self.backbone.context(used, 1), self.schedule, self.backbone.prediction_type,
            self.lora["targets"], self.lora["rank"], self.lora["alpha"],
            self.lora["control_targets"], self.lora["control_rank"])
        trained, losses = finetune(task, {"latent": latents, **conds},
                                   steps=self.lora["steps"], batch=self.lora["batch"],
                                   learning_rate=self.lora["lr"], seed=self.seed,
                                   fast_compile=self.fast_compile)
        sections = {"settings": self._settings_section(hints),
                    "lora": L.pack(trained["lora"], self.lora["bits"])}
        for name in sorted(trained.get("control_lora", {})):
            sections[f"control_lora/{name}"] = L.pack(trained["control_lora"][name],
                                                      self.lora["bits"])
        for name in self.transmit:
            sections[f"hint/{name}"] = hints[name]["stream"]
        data = bitstream.pack(self.codec_id, fp, list(sections.values()), height=h, width=w,
                              frames=t, fps=fps)
        return Transmission(data, trained, hints, sections, losses,
                            {"hints": hint_seconds, "lora": time.perf_counter() - started})

    def _encode_latents(self, vae_params, frames: np.ndarray) -> np.ndarray:
        fn = self._sample_fns.get("encode")
        if fn is None:
            fn = self._sample_fns["encode"] = jit(
                lambda p, x: self.backbone.encode(p, x.astype(jnp.float32) / 255.0),
                self.fast_compile)
        return np.concatenate([np.asarray(fn(vae_params, frames[i:i + 1]))
                               for i in range(frames.shape[0])])

    def _settings_section(self, hints: Mapping[str, dict]) -> bytes:
        out = _HEAD.pack(FORMAT_VERSION, self.seed, self.steps, self.start_step, self.window,
                         self.output_median_radius, int(self.lora["control_rank"] > 0),
                         len(self.transmit))
        for name in self.transmit:
            cfg, size = self.hint_settings[name], hints[name]["size"]
            out += _HINT.pack(HINT_IDS[name], CODEC_IDS[cfg["codec"]], cfg["crf"], size[0],
                              size[1], cfg["control_scale"] if name in self.controlnets
                              else 0.0, hints[name]["crc"])
        return out + struct.pack("<I", zlib.crc32(out))

    # ----------------------------------------------------------------- receiver
    def split(self, params: Any, data: bytes) -> dict:
        """Verify the container and every section: ``{"header", "settings", "lora",
        "control_lora", "hints": {name: {"codec", "crf", "size", "control_scale",
        "pictures"}}, "sizes": {section name: bytes}}``."""
        used, fp = self._prepared(params)
        header, sections = bitstream.unpack(data, codec_id=self.codec_id, fingerprint=fp)
        first = sections[0]
        if len(first) < _HEAD.size + 4 or \
                zlib.crc32(first[:-4]) != struct.unpack("<I", first[-4:])[0]:
            raise CorruptError("hint settings section is damaged (length or CRC)")
        first = first[:-4]
        version, seed, steps, start, window, median, has_cl, n = _HEAD.unpack_from(first)
        if version != FORMAT_VERSION:
            raise CorruptError(f"hint settings version {version} (this diffjax reads "
                               f"{FORMAT_VERSION})")
        n_cl = len(self.controlnets) if has_cl else 0
        if has_cl > 1 or not 1 <= steps or start >= steps or not window or median > 32 or \
                len(first) != _HEAD.size + n * _HINT.size or len(sections) != 2 + n_cl + n or \
                header.channels != 3:
            raise CorruptError("hint settings section is inconsistent with the file")
        if self.motion is not None and window > self.motion.motion_max_seq_length:
            raise CorruptError(f"hint window {window} exceeds the motion module's "
                               f"{self.motion.motion_max_seq_length} frames")
        names = {v: k for k, v in HINT_IDS.items()}
        codecs = {v: k for k, v in CODEC_IDS.items()}
        out = {"header": header, "seed": seed, "steps": steps, "start_step": start,
               "window": window, "output_median_radius": median, "hints": {},
               "sizes": {"container": header.header_size, "settings": len(sections[0]),
                         "lora": len(sections[1])}}
        out["lora"] = self._unpack_lora(sections[1], used["unet"], "LoRA")
        out["control_lora"] = {}
        for i, name in enumerate(sorted(self.controlnets) if has_cl else ()):
            out["control_lora"][name] = self._unpack_lora(
                sections[2 + i], used["controlnets"][name], f"{name} control-LoRA")
            out["sizes"][f"control_lora/{name}"] = len(sections[2 + i])
        for i in range(n):
            hid, cid, crf, sh, sw, scale, crc = _HINT.unpack_from(first, _HEAD.size +
                                                                     i * _HINT.size)
            name = names.get(hid)
            if name is None or cid not in codecs or crf > 51 or name in out["hints"] or \
                    not (G.MIN_STREAM_SIDE <= sh <= 2 * header.height + G.MIN_STREAM_SIDE) or \
                    not (G.MIN_STREAM_SIDE <= sw <= 2 * header.width + G.MIN_STREAM_SIDE) or \
                    sh % 2 or sw % 2 or not math.isfinite(scale):
                raise CorruptError(f"hint settings entry {i} is invalid")
            stream = sections[2 + n_cl + i]
            if not stream:
                raise CorruptError(f"hint section {name!r} is empty")
            pictures = G.decode_hint(stream, codecs[cid], (sh, sw), header.frames, crc)
            out["hints"][name] = {"codec": codecs[cid], "crf": crf, "size": (sh, sw),
                                  "control_scale": float(scale), "pictures": pictures}
            out["sizes"][f"hint/{name}"] = len(stream)
        missing = set(self.controlnets) - set(out["hints"])
        if missing or (start and "colour" not in out["hints"]):
            raise CorruptError(f"the file lacks the hint(s) {sorted(missing) or ['colour']} "
                               "this model needs")
        return out

    @staticmethod
    def section_names(data: bytes) -> list[str]:
        """Names of a file's sections (``diffjax info``), read from the settings section
        without the model: ``settings``, ``lora``, ``control_lora/<hint>`` (as many as there
        are between the LoRA and the streams), ``hint/<name>``."""
        header, sections = bitstream.unpack(data)
        first = sections[0]
        if len(first) < _HEAD.size + 4:
            raise CorruptError("hint settings section is truncated")
        n = _HEAD.unpack_from(first)[-1]
        names = {v: k for k, v in HINT_IDS.items()}
        entries = [_HINT.unpack_from(first, _HEAD.size + i * _HINT.size) for i in range(n)
                   if _HEAD.size + (i + 1) * _HINT.size <= len(first)]
        hints = [names.get(e[0], "?") for e in entries]
        n_cl = len(sections) - 2 - len(hints)
        guided = sorted(h for h, e in zip(hints, entries) if e[5] != 0)  # a ControlNet scale
        control = guided if len(guided) == n_cl else [str(i) for i in range(max(n_cl, 0))]
        return (["settings", "lora"] + [f"control_lora/{c}" for c in control]
                + [f"hint/{h}" for h in hints])

    @staticmethod
    def _unpack_lora(section: bytes, like: Any, what: str) -> dict:
        try:
            return L.unpack(section, like=like)
        except BitstreamError:
            raise
        except (InputError, ValueError) as err:
            raise CorruptError(f"hint {what} section: {err}") from err

    def decode_frames(self, params: Any, data: bytes) -> Iterator[np.ndarray]:
        """Frames one by one (module docstring); everything is verified first."""
        parts = self.split(params, data)
        return self._frames(params, parts)

    def _frames(self, params, parts):
        """Decode window by window: conditions, start latents and output frames are held
        for one window (and the output median's ``radius`` neighbours) at a time."""
        used, _ = self._prepared(params)
        header = parts["header"]
        t, h, w = header.frames, header.height, header.width
        pictures = {k: v["pictures"] for k, v in parts["hints"].items()}
        scales = tuple(parts["hints"][k]["control_scale"] for k in sorted(self.controlnets))
        model = self._merged(used, parts)
        win, r = parts["window"], parts["output_median_radius"]
        fn = self._sampler(parts["steps"], win, scales, self._geometry(h, w)["latent"])
        buffer: list = []  # output frames first, first + 1, ...
        first = emitted = 0
        for k, lo in enumerate(range(0, t, win)):
            idx = np.minimum(np.arange(lo, lo + win), t - 1)  # the last window edge-padded
            window = {name: p[idx] for name, p in pictures.items()}
            conds = self._conditions(window, h, w)
            start_latent = None
            if parts["start_step"]:
                up = G.resize(window["colour"], h, w, "bicubic")
                start_latent = self._encode_latents(used["vae"], pad_to_multiple(up, self.stride))
            out = fn(model, [conds[name] for name in sorted(self.controlnets)], start_latent,
                     np.uint32(parts["seed"]), np.uint32(k), np.int32(parts["start_step"]))
            buffer.extend(crop(np.asarray(out)[: min(win, t - lo)], h, w))
            while emitted < t and (emitted + r < first + len(buffer)
                                   or first + len(buffer) == t):
                lo_i = max(0, emitted - r)
                near = np.stack(buffer[lo_i - first: emitted + r + 1 - first])
                yield near[emitted - lo_i] if r == 0 else np.median(
                    near, axis=0).round().astype(np.uint8)
                emitted += 1
                drop = max(0, emitted - r) - first
                if drop > 0:
                    del buffer[:drop]
                    first += drop

    def _merged(self, used, parts) -> dict:
        from diffjax.models.unet3d import merge_motion_params

        unet = L.merge(used["unet"], parts["lora"])
        nets = {k: used["controlnets"][k] for k in self.controlnets}
        for name, adapter in parts["control_lora"].items():
            nets[name] = L.merge(nets[name], adapter)
        denoiser = merge_motion_params(unet, used["motion"]) if self.motion else unet
        return {"denoiser": denoiser, "controlnets": [nets[k] for k in sorted(nets)],
                "vae": used["vae"], "context": self.backbone.context(used, 1)}

    def _sampler(self, steps: int, window: int, scales: tuple, latent_hw: tuple):
        """The jitted window decoder for ``(steps, window, scales, latent size)``."""
        key = (steps, window, scales, latent_hw)
        if key in self._sample_fns:
            return self._sample_fns[key]
        from diffjax.diffusion import get_sampler, noise_to_step, run_plan
        from diffjax.models.controlnet import MultiControlNet, per_frame

        plan = get_sampler("ddim").plan(self.backbone.scheduler_config, steps)
        nets = MultiControlNet(tuple(self.controlnets[k] for k in sorted(self.controlnets))) \
            if self.controlnets else None
        bb = self.backbone

        def denoise(m, x_t, t, conds):
            # x_t [1, F, h, w, C]; ControlNets per frame, the motion UNet on the window
            f = x_t.shape[1]
            ctx = m["context"]
            tt = jnp.full((1,), t, jnp.float32)
            extra = {}
            if nets is not None:
                down, mid = per_frame(
                    lambda x, *c: nets.apply(m["controlnets"], x, jnp.full((x.shape[0],), t),
                                             jnp.broadcast_to(ctx, (x.shape[0],) + ctx.shape[1:]),
                                             list(c), list(scales)),
                    x_t, *[c[None] for c in conds])
                fold = lambda a: a.reshape((f,) + a.shape[2:])  # noqa: E731
                extra = dict(down_block_additional_residuals=tuple(fold(d) for d in down),
                             mid_block_additional_residual=fold(mid))
            if self.motion is not None:
                return self.motion.apply({"params": m["denoiser"]}, x_t, tt, ctx, **extra)
            y = self.unet.apply({"params": m["denoiser"]}, x_t[0], jnp.full((f,), t),
                                jnp.broadcast_to(ctx, (f,) + ctx.shape[1:]), **extra)
            return y[None]

        def run(m, conds, start_latent, seed, index, start):
            shape = (1, window) + tuple(latent_hw) + (bb.latent_channels,)
            key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(0), seed), index)
            noise = jax.random.normal(key, shape, jnp.float32)
            x = noise if start_latent is None else noise_to_step(plan, start_latent[None],
                                                                 noise, start)
            y = run_plan(plan, lambda x_t, t, c: denoise(m, x_t, t, c), x, start_step=start,
                         cond=list(conds))
            img = bb.decode(m["vae"], y[0])
            return jnp.round(jnp.clip(img, 0.0, 1.0) * 255.0).astype(jnp.uint8)

        fn = jit(run, self.fast_compile)
        self._sample_fns[key] = fn
        return fn


def _filter(tree: Any, keep) -> dict:
    """The sub-tree of ``tree`` whose leaf paths satisfy ``keep(path)``."""
    import flax

    flat = flax.traverse_util.flatten_dict(tree)
    kept = {k: v for k, v in flat.items()
            if keep(tuple(jax.tree_util.DictKey(p) for p in k))}
    return flax.traverse_util.unflatten_dict(kept)
