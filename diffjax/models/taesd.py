"""TAESD-family tiny autoencoders (Flax port) and a torch-free loader for their ``.pth`` files.

TAESD (Ollin Boer Bohan, github.com/madebyollin/taesd, MIT) is a ~1.2 M parameter
distillation of a latent-diffusion VAE: the same latent space at a fraction of the cost.
diffjax uses it as a frozen first-stage autoencoder, e.g. TAEF2 (the FLUX.2 latent space,
32 channels, /8) for the foundation latent codec (Relic et al., ECCV 2024) on machines
without Stable Diffusion weights.

Both networks are plain ``nn.Sequential`` stacks in the reference; this port keeps the
*same layer indices* so that a state-dict key ``"<i>.<rest>"`` maps onto the Flax submodule
``layers_<i>`` one-to-one:

* ``Encoder``: ``conv(3,64), Block, [conv s2, Block x3] x3, conv(64, C)``; image in
  ``[0, 1]`` -> raw latent, /8.
* ``Decoder``: ``Clamp, conv(C,64), ReLU, [Block x3, Upsample x2, conv] x3, Block,
  conv(64,3)``; raw latent -> image (roughly ``[0, 1]``, not clamped).
* ``arch_variant="flux_2"`` (TAEF2): the three lowest-resolution Blocks (encoder 11-13,
  decoder 3-5) get a ``pool`` branch ``x + conv1x1(GN(4) -> ReLU -> conv1x1)``
  ("mid-block GroupNorm").
* ``arch_variant="f32"`` (TAESana, Sana DC-AE f32c32): /32 ``F32Encoder`` / ``F32Decoder``.

``Block(x) = ReLU(conv3(ReLU(conv3(ReLU(conv3(x))))) + skip(x))`` with ``skip`` a bias-free
1x1 conv when the width changes. ``Clamp(x) = 3 tanh(x / 3)`` bounds decoder inputs.
NHWC throughout; convs compute in ``dtype``, the GroupNorm in float32.

Usage::

    enc, enc_params = load_taesd("../shared/data/taesd/taef2_encoder.pth")
    dec, dec_params = load_taesd("../shared/data/taesd/taef2_decoder.pth")
    y = enc.apply({"params": enc_params}, image01)      # [B, H/8, W/8, 32]
    x = dec.apply({"params": dec_params}, y)            # [B, H, W, 3]
"""
from __future__ import annotations

import pickle
import zipfile
from typing import Any, ClassVar

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffjax.errors import CheckpointError, InputError
from diffjax.nn.layers import conv2d, group_norm
from diffjax.nn.resnet import nearest_upsample

Dtype = Any

ARCH_VARIANTS = (None, "flux_2", "f32")
# scale_latents / unscale_latents of the reference: raw latents <-> [0, 1].
LATENT_MAGNITUDE = 3.0
LATENT_SHIFT = 0.5
GN_EPS = 1e-5  # torch.nn.GroupNorm default

# A layer spec is a tuple: ("conv", c_in, c_out, stride, bias) | ("block", c_in, c_out,
# midblock_gn) | ("relu",) | ("clamp",) | ("up",). Index in the tuple == torch index.


def _conv(c_in, c_out, stride=1, bias=True):
    return ("conv", c_in, c_out, stride, bias)


def _block(c_in, c_out, gn=False):
    return ("block", c_in, c_out, gn)


def encoder_layers(latent_channels: int, arch_variant: str | None = None) -> tuple:
    """Layer specs of ``Encoder`` / ``F32Encoder`` (reference ``taesd.py``)."""
    _check_variant(arch_variant)
    if arch_variant == "f32":
        head = (_conv(3, 32, 2), ("relu",), _conv(32, 64, 2), ("relu",), _block(64, 64))
        stages = 3
    else:
        head = (_conv(3, 64), _block(64, 64))
        stages = 3
    gn = arch_variant == "flux_2"
    body = ()
    for stage in range(stages):
        last = stage == stages - 1
        body += (_conv(64, 64, 2, False),) + (_block(64, 64, gn and last),) * 3
    return head + body + (_conv(64, latent_channels),)


def decoder_layers(latent_channels: int, arch_variant: str | None = None) -> tuple:
    """Layer specs of ``Decoder`` / ``F32Decoder`` (reference ``taesd.py``)."""
    _check_variant(arch_variant)
    widths = (256, 128, 64, 64, 64, 64) if arch_variant == "f32" else (64, 64, 64, 64)
    gn = arch_variant == "flux_2"
    layers = (("clamp",), _conv(latent_channels, widths[0]), ("relu",))
    for i, (w_in, w_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers += (_block(w_in, w_in, gn and i == 0),) * 3
        layers += (("up",), _conv(w_in, w_out, 1, False))
    return layers + (_block(widths[-1], widths[-1]), _conv(widths[-1], 3))


def _check_variant(arch_variant):
    if arch_variant not in ARCH_VARIANTS:
        raise InputError(f"unknown TAESD arch_variant {arch_variant!r}; "
                         f"expected one of {ARCH_VARIANTS}")


def clamp_latents(x):
    """The decoder's input ``Clamp``: ``3 tanh(x / 3)`` (soft clip to ``(-3, 3)``)."""
    return jnp.tanh(x / 3.0) * 3.0


def scale_latents(x):
    """Raw latents -> ``[0, 1]``: ``clip(x / 6 + 0.5, 0, 1)`` (reference ``scale_latents``)."""
    return jnp.clip(x / (2 * LATENT_MAGNITUDE) + LATENT_SHIFT, 0.0, 1.0)


def unscale_latents(x):
    """``[0, 1]`` -> raw latents (inverse of :func:`scale_latents` inside its range)."""
    return (x - LATENT_SHIFT) * (2 * LATENT_MAGNITUDE)


class TAESDBlock(nn.Module):
    """The reference ``Block``: three 3x3 convs with ReLUs, a residual and a final ReLU.

    With ``midblock_gn`` the input first gets ``x + pool(x)``, ``pool = conv1x1(4C) ->
    GroupNorm(4) -> ReLU -> conv1x1(C)`` (FLUX.2 variant; names ``pool_0/1/3``).
    """

    out_channels: int
    midblock_gn: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        c_in = x.shape[-1]
        if self.midblock_gn:
            h = conv2d(4 * c_in, kernel_size=1, use_bias=False, name="pool_0", **kw)(x)
            h = group_norm(4, eps=GN_EPS, name="pool_1", param_dtype=self.param_dtype)(h)
            h = nn.relu(h).astype(self.dtype)
            x = x + conv2d(c_in, kernel_size=1, use_bias=False, name="pool_3", **kw)(h)
        h = x
        for i in (0, 2, 4):
            h = conv2d(self.out_channels, name=f"conv_{i}", **kw)(h)
            if i < 4:
                h = nn.relu(h)
        skip = x
        if c_in != self.out_channels:
            skip = conv2d(self.out_channels, kernel_size=1, use_bias=False, name="skip", **kw)(x)
        return nn.relu(h + skip)


class _TAESDSequential(nn.Module):
    """Runs a layer-spec tuple; submodule ``layers_<i>`` is torch index ``<i>``."""

    latent_channels: int = 4
    arch_variant: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    kind: ClassVar[str] = ""

    def layer_specs(self) -> tuple:
        raise NotImplementedError

    def _run(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for i, spec in enumerate(self.layer_specs()):
            op = spec[0]
            if op == "conv":
                _, _, c_out, stride, bias = spec
                x = conv2d(c_out, stride=stride, use_bias=bias, name=f"layers_{i}", **kw)(x)
            elif op == "block":
                _, _, c_out, gn = spec
                x = TAESDBlock(c_out, midblock_gn=gn, name=f"layers_{i}", **kw)(x)
            elif op == "relu":
                x = nn.relu(x)
            elif op == "clamp":
                x = clamp_latents(x)
            elif op == "up":
                x = nearest_upsample(x)
        return x


class TAESDEncoder(_TAESDSequential):
    """TAESD encoder: image ``[B, H, W, 3]`` in ``[0, 1]`` -> raw latent ``[B, H/f, W/f, C]``.

    ``f`` is 8 (32 for ``arch_variant="f32"``); odd sizes round up like the reference's
    padded stride-2 convs. Callers pad images to a multiple of ``f`` for exact geometry.
    """

    kind: ClassVar[str] = "encoder"

    def layer_specs(self):
        return encoder_layers(self.latent_channels, self.arch_variant)

    @property
    def factor(self) -> int:
        return 32 if self.arch_variant == "f32" else 8

    @nn.compact
    def __call__(self, x):
        chex.assert_rank(x, 4)
        chex.assert_axis_dimension(x, 3, 3)
        y = self._run(x.astype(self.dtype))
        chex.assert_shape(y, (x.shape[0], None, None, self.latent_channels))
        return y


class TAESDDecoder(_TAESDSequential):
    """TAESD decoder: raw latent ``[B, h, w, C]`` -> image ``[B, f h, f w, 3]`` (~``[0, 1]``)."""

    kind: ClassVar[str] = "decoder"

    def layer_specs(self):
        return decoder_layers(self.latent_channels, self.arch_variant)

    @property
    def factor(self) -> int:
        return 32 if self.arch_variant == "f32" else 8

    @nn.compact
    def __call__(self, y):
        chex.assert_rank(y, 4)
        chex.assert_axis_dimension(y, 3, self.latent_channels)
        x = self._run(y.astype(self.dtype))
        chex.assert_shape(x, (y.shape[0], self.factor * y.shape[1], self.factor * y.shape[2], 3))
        return x


# --------------------------------------------------------------------------------------
# Reading PyTorch zip-format state dicts without torch.

_STORAGE_DTYPES = {
    "HalfStorage": np.float16, "FloatStorage": np.float32, "DoubleStorage": np.float64,
    "BFloat16Storage": None,  # numpy has no bfloat16: refused below with a clear message
}


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, hooks=None,
                       metadata=None):
    """numpy stand-in for ``torch._utils._rebuild_tensor_v2`` (a strided view, copied)."""
    size, stride = tuple(size), tuple(stride)
    if not size:
        return np.array(storage[offset], copy=True)
    need = offset + 1 + sum((n - 1) * s for n, s in zip(size, stride))
    if need > storage.size:
        raise pickle.UnpicklingError(f"tensor of size {size} overruns its storage")
    view = np.lib.stride_tricks.as_strided(
        storage[offset:], shape=size, strides=tuple(s * storage.itemsize for s in stride))
    return np.array(view, copy=True)


class _StateDictUnpickler(pickle.Unpickler):
    """Restricted unpickler for ``torch.save(state_dict)`` archives: only an OrderedDict of
    tensors is allowed; storages come from the zip through ``persistent_load``."""

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str):
        super().__init__(file)
        self._archive, self._prefix = archive, prefix

    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            import collections
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if module == "torch" and name in _STORAGE_DTYPES:
            return name  # the storage type travels as its name into persistent_load
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid
        dtype = _STORAGE_DTYPES.get(storage_type)
        if dtype is None:
            raise pickle.UnpicklingError(f"unsupported storage type {storage_type}")
        raw = self._archive.read(f"{self._prefix}/data/{key}")
        arr = np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<"))
        if arr.size != numel:
            raise pickle.UnpicklingError(f"storage {key} has {arr.size} elements, expected {numel}")
        return arr


def read_torch_state_dict(path) -> dict[str, np.ndarray]:
    """Read a PyTorch zip-format ``state_dict`` (``torch.save``) into numpy arrays, no torch.

    Only tensors (float16/32/64) in an ``OrderedDict`` are accepted; anything else (code
    objects, other globals, legacy non-zip pickles) raises :class:`CheckpointError`.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            pkls = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
            if len(pkls) != 1:
                raise CheckpointError(f"{path}: expected one <name>/data.pkl in the zip, "
                                      f"found {len(pkls)}")
            prefix = pkls[0].split("/")[0]
            byteorder = f"{prefix}/byteorder"
            if byteorder in archive.namelist() and archive.read(byteorder).strip() != b"little":
                raise CheckpointError(f"{path}: big-endian checkpoints are not supported")
            with archive.open(pkls[0]) as f:
                state = _StateDictUnpickler(f, archive, prefix).load()
    except (zipfile.BadZipFile, pickle.UnpicklingError, KeyError, EOFError, ValueError,
            TypeError, AttributeError) as err:
        if isinstance(err, CheckpointError):
            raise
        raise CheckpointError(f"{path}: not a readable PyTorch state_dict ({err})") from err
    if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, np.ndarray) for k, v in state.items()):
        raise CheckpointError(f"{path}: not a state_dict of tensors")
    return dict(state)


def infer_architecture(state: dict[str, np.ndarray]) -> tuple[str, int, str | None]:
    """``(kind, latent_channels, arch_variant)`` of a TAESD state dict, from its keys/shapes."""
    if "0.weight" in state and state["0.weight"].ndim == 4 and state["0.weight"].shape[1] == 3:
        kind = "encoder"
        f32 = state["0.weight"].shape[0] == 32
        key = f"{len(encoder_layers(1, 'f32' if f32 else None)) - 1}.weight"  # final conv
        if key not in state or state[key].ndim != 4:
            raise CheckpointError(f"TAESD encoder: final conv {key!r} missing or not a conv")
        latent_channels = int(state[key].shape[0])
    elif "1.weight" in state and state["1.weight"].ndim == 4:
        kind = "decoder"
        latent_channels = int(state["1.weight"].shape[1])
        f32 = state["1.weight"].shape[0] == 256
    else:
        raise CheckpointError("not a TAESD encoder or decoder state dict "
                              f"(first keys: {sorted(state)[:5]})")
    if any(".pool." in k for k in state):
        variant = "flux_2"
    else:
        variant = "f32" if f32 else None
    return kind, latent_channels, variant


def _torch_to_flax(key: str, value: np.ndarray) -> tuple[tuple[str, ...], np.ndarray]:
    """``"11.pool.1.weight"`` -> ``("layers_11", "pool_1", "scale")`` (+ layout transpose)."""
    parts = key.split(".")
    path = [f"layers_{parts[0]}"]
    rest, leaf = parts[1:-1], parts[-1]
    if len(rest) == 2:                     # "conv.0", "pool.1"
        path.append(f"{rest[0]}_{rest[1]}")
    elif len(rest) == 1:                   # "skip"
        path.append(rest[0])
    elif rest:
        raise CheckpointError(f"unexpected key {key!r}")
    if value.ndim == 4:                    # conv OIHW -> HWIO
        return tuple(path) + ("kernel",), np.transpose(value, (2, 3, 1, 0))
    if leaf == "weight":                   # GroupNorm affine
        return tuple(path) + ("scale",), value
    return tuple(path) + (leaf,), value


def _flatten(tree, prefix=()):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def _unflatten(flat):
    tree: dict = {}
    for path, v in flat.items():
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return tree


def convert_state_dict(module: _TAESDSequential, state: dict[str, np.ndarray]) -> dict:
    """Map a torch state dict onto ``module``'s parameter tree, strictly.

    Raises :class:`CheckpointError` naming every missing, unexpected or mis-shaped key.
    """
    probe = jnp.zeros((1, 64, 64, 3) if module.kind == "encoder"
                      else (1, 2, 2, module.latent_channels), jnp.float32)
    expected = _flatten(nn.unbox(jax.eval_shape(module.init, jax.random.key(0), probe))["params"])
    got, unexpected = {}, []
    for key, value in state.items():
        try:
            path, arr = _torch_to_flax(key, value)
        except CheckpointError:
            unexpected.append(key)
            continue
        if path in expected:
            got[path] = (key, arr)
        else:
            unexpected.append(key)
    missing = ["/".join(p) for p in expected if p not in got]
    bad_shape = [f"{key} {tuple(state[key].shape)} (expected a tensor for "
                 f"{'/'.join(p)} {tuple(expected[p].shape)})"
                 for p, (key, arr) in got.items() if arr.shape != expected[p].shape]
    if missing or unexpected or bad_shape:
        lines = []
        if missing:
            lines.append(f"missing: {', '.join(missing)}")
        if unexpected:
            lines.append(f"unexpected: {', '.join(sorted(unexpected))}")
        if bad_shape:
            lines.append(f"wrong shape: {', '.join(bad_shape)}")
        raise CheckpointError(f"TAESD {module.kind} (latent_channels={module.latent_channels}, "
                              f"arch_variant={module.arch_variant}) does not match the "
                              f"checkpoint; " + "; ".join(lines))
    return _unflatten({p: jnp.asarray(arr, module.param_dtype) for p, (_, arr) in got.items()})


def load_taesd(path, *, kind: str | None = None, latent_channels: int | None = None,
               arch_variant: str | None = "infer", dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32):
    """Load a TAESD-family ``*_encoder.pth`` / ``*_decoder.pth`` -> ``(module, params)``.

    The architecture (encoder/decoder, latent channels, ``flux_2``/``f32`` variant) is
    inferred from the tensors unless given; loading is strict (see
    :func:`convert_state_dict`). Weights (stored in float16) are cast to ``param_dtype``.
    Apply with ``module.apply({"params": params}, x)``.
    """
    state = read_torch_state_dict(path)
    got_kind, got_channels, got_variant = infer_architecture(state)
    kind = kind or got_kind
    if kind not in ("encoder", "decoder"):
        raise InputError(f"kind must be 'encoder' or 'decoder', got {kind!r}")
    cls = TAESDEncoder if kind == "encoder" else TAESDDecoder
    module = cls(latent_channels=latent_channels or got_channels,
                 arch_variant=got_variant if arch_variant == "infer" else arch_variant,
                 dtype=dtype, param_dtype=param_dtype)
    try:
        params = convert_state_dict(module, state)
    except CheckpointError as err:
        raise CheckpointError(f"{path}: {err}") from None
    return module, params
