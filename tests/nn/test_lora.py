"""diffjax.nn.lora: targets, init, merge / unmerge, unmerged apply, gradients, optimizer
state, sharding (mesh jit, pmap) and the bitstream (pack / unpack). No torch here; the
parity with diffusers + peft is in ``tests/convert/test_lora_convert.py``."""
from __future__ import annotations

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import flax.linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from diffjax.convert.core import build_model, param_template
from diffjax.entropy.bitstream import CorruptError, TruncatedError, WrongModelError
from diffjax.errors import BitstreamError, CheckpointError, InputError
from diffjax.nn import lora as L
from diffjax.nn import lora_pack
from diffjax.nn.layers import conv2d, dense, host_random_params
from diffjax.nn.resnet import Upsample2D
from diffjax.train import optim

# SD 2.1 layout (linear projections), two levels, tiny widths. UNet tests run eagerly:
# op-by-op execution of this model costs ~1 s after the first call, a jit compile of it
# tens of seconds on a 2-core CPU; jit / pmap / mesh are tested on a small module below.
TINY = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(8, 16), norm_num_groups=4, cross_attention_dim=8,
            attention_head_dim=2, use_linear_projection=True,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
ATTN = "to_q|to_k|to_v|to_out.0"
LOCON = [ATTN, "conv1", "conv2", "proj_in", "conv"]


@functools.lru_cache(maxsize=None)
def model():
    module = build_model(TINY)
    template = flax.traverse_util.unflatten_dict(param_template(module))
    return module, host_random_params(template, 0, jitter=0.1)


def inputs(size=8, batch=2):
    rng = np.random.default_rng(0)
    return (rng.standard_normal((batch, size, size, 4), np.float32),
            np.array([999.0, 17.0][:batch], np.float32),
            rng.standard_normal((batch, 3, 8), np.float32))


def random_lora(params, targets, rank=4, alpha=8.0, seed=1):
    """An adapter with non-zero ``up`` (a fresh one is the identity)."""
    lora = L.init(jax.random.PRNGKey(seed), params, targets, rank, alpha)
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda p, x: x if p[-1].key == "alpha" else jnp.asarray(
            0.1 * rng.standard_normal(x.shape), jnp.float32), lora)


def fwd():
    module, _ = model()
    plain = lambda p, x, t, c: module.apply({"params": p}, x, t, c)  # noqa: E731
    unmerged = lambda p, l, x, t, c, s: L.apply(module, p, l, x, t, c, scale=s)  # noqa: E731
    return plain, unmerged


class Micro(nn.Module):
    """A few diffusers-named layers: dense, conv, a strided conv and the folded upsampler."""

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=jnp.float32, param_dtype=jnp.float32)
        h = dense(16, name="to_q", **kw)(x)
        h = conv2d(16, name="conv1", **kw)(jax.nn.silu(h))
        h = conv2d(16, stride=2, name="conv", **kw)(h)
        h = Upsample2D(16, name="upsamplers_0", **kw)(h)  # >64 px input: NearestUpsampleConv
        return dense(8, name="to_out_0", **kw)(h)


@functools.lru_cache(maxsize=None)
def micro():
    module = Micro()
    params = module.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 8)))["params"]
    return module, jax.tree.map(np.asarray, nn.meta.unbox(params))


def micro_input(batch=8):
    return np.random.default_rng(1).standard_normal((batch, 32, 32, 8)).astype(np.float32)


def test_targets_use_peft_names():
    _, params = model()
    attn = L.select(params, ATTN)
    names = [L.diffusers_name(p) for p in attn]
    assert len(attn) == 4 * 2 * 4  # 4 transformer blocks x (attn1, attn2) x (q, k, v, out)
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0" in names
    assert L.select(params, "to_q") == L.select(params, ["to_q"])
    conv1 = [L.diffusers_name(p) for p in L.select(params, "conv1")]
    assert conv1 and all(n.endswith(("resnets.0.conv1", "resnets.1.conv1")) for n in conv1)
    full = L.select(params, r"mid_block\.attentions\.0\..*attn2\.to_k")
    assert [L.diffusers_name(p) for p in full] == [
        "mid_block.attentions.0.transformer_blocks.0.attn2.to_k"]
    # "linear_1" of the time embedding is a name, not list index 1
    assert "time_embedding.linear_1" in [L.diffusers_name(p) for p in L.select(params, "linear_1")]
    with pytest.raises(InputError, match="match no module"):
        L.select(params, ["to_q", "no_such_layer"])
    with pytest.raises(InputError, match="not a valid regex"):
        L.select(params, "to_q(")


def test_init_shapes_and_identity():
    module, params = model()
    lora = L.init(jax.random.PRNGKey(3), params, LOCON, rank=4, alpha=8)
    items = L.entries(lora)
    kernels = L.adaptable_modules(params)
    conv = [p for p in items if kernels[p].ndim == 4]
    assert conv, "LoCon targets must include convolutions"
    for p in conv:
        kh, kw, i, o = kernels[p].shape
        assert items[p]["down"].shape == (kh, kw, i, 4) and items[p]["up"].shape == (1, 1, 4, o)
    assert all(float(e["alpha"]) == 8.0 for e in items.values())
    assert all(float(jnp.abs(e["down"]).max()) > 0 for e in items.values())
    plain, unmerged = fwd()
    x = inputs()
    np.testing.assert_array_equal(np.asarray(plain(params, *x)),
                                  np.asarray(unmerged(params, lora, *x, 1.0)))


@pytest.mark.parametrize("targets", [pytest.param(ATTN, marks=pytest.mark.slow), LOCON],
                         ids=["attention", "locon"])
def test_merge_unmerge_and_unmerged_apply(targets):
    module, params = model()
    lora = random_lora(params, targets)
    plain, unmerged = fwd()
    x = inputs()
    merged = jax.jit(L.merge)(params, lora, 0.7)
    back = jax.jit(L.unmerge)(merged, lora, 0.7)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        np.testing.assert_allclose(np.asarray(a), b, atol=2e-6, rtol=0)
    base = np.asarray(plain(params, *x))
    out_merged = np.asarray(plain(merged, *x))
    out_unmerged = np.asarray(unmerged(params, lora, *x, 0.7))
    assert np.abs(out_merged - base).max() > 1e-2 * np.abs(base).max()  # the adapter acts
    np.testing.assert_allclose(out_unmerged, out_merged, atol=1e-4 * np.abs(base).max())
    np.testing.assert_allclose(np.asarray(unmerged(params, lora, *x, 0.0)), base,
                               atol=1e-6 * np.abs(base).max())


def test_jit_merged_equals_unmerged_with_folded_upsampler():
    """Dense, conv, strided conv and the folded NearestUpsampleConv (not an nn.Conv, so
    the unmerged path adds its update through the kernel), under jax.jit."""
    module, params = micro()
    lora = random_lora(params, ["to_q", "conv1", "conv", "to_out.0"])
    assert sorted(L.names_of(lora)) == ["conv", "conv1", "to_out.0", "to_q", "upsamplers.0.conv"]
    x = micro_input(2)
    base = np.asarray(module.apply({"params": params}, x))
    merged = np.asarray(jax.jit(lambda p, l: module.apply({"params": L.merge(p, l)}, x))(
        params, lora))
    unmerged = np.asarray(jax.jit(lambda p, l: L.apply(module, p, l, x))(params, lora))
    assert np.abs(merged - base).max() > 1e-2 * np.abs(base).max()
    np.testing.assert_allclose(unmerged, merged, atol=1e-5 * np.abs(base).max())


def test_check_refuses_other_models():
    _, params = model()
    lora = L.init(jax.random.PRNGKey(0), params, "to_q", 2)
    other = build_model(dict(TINY, block_out_channels=(8, 24)))
    other_params = flax.traverse_util.unflatten_dict(param_template(other))
    with pytest.raises(CheckpointError, match="does not fit"):
        L.merge(other_params, lora)
    with pytest.raises(CheckpointError, match="not a LoRA tree"):
        L.entries({"x": {"kernel": np.zeros((2, 2))}})


def test_gradients_and_optimizer_state_only_lora():
    module, params = micro()
    lora = random_lora(params, ["to_q", "conv1", "conv", "to_out.0"])
    x = micro_input(2)
    loss = lambda l, p: jnp.mean(jnp.square(L.apply(module, p, l, x)))  # noqa: E731
    g_lora = jax.jit(jax.grad(loss))(lora, params)
    for entry in L.entries(g_lora).values():
        assert float(jnp.abs(entry["down"]).max()) > 0 and float(jnp.abs(entry["up"]).max()) > 0
        assert float(entry["alpha"]) == 0.0  # alpha never trains
    # d loss / d base exists only if asked for: the train task never differentiates the base
    tx = optim.make_optimizer({"learning_rate": 1e-3}, 10, L.param_labels(lora))
    state = tx.init(lora)
    big = sorted(tuple(np.shape(a)) for a in jax.tree.leaves(state) if np.ndim(a) > 0)
    lora_shapes = sorted(tuple(np.shape(e[k])) for e in L.entries(lora).values()
                         for k in ("down", "up"))
    assert big == sorted(lora_shapes * 2)  # Adam mu and nu of down/up, nothing else
    assert all(np.size(a) == 1 for a in jax.tree.leaves(state) if np.ndim(a) == 0)
    updates, _ = tx.update(g_lora, state, lora)
    assert all(float(e["alpha"]) == 0.0 for e in L.entries(updates).values())


def test_mesh_sharded_jit_and_pmap():
    module, params = micro()
    lora = random_lora(params, ["to_q", "conv1", "conv", "to_out.0"])
    x = micro_input(8)
    ref = np.asarray(jax.jit(lambda p, l, x: L.apply(module, p, l, x))(params, lora, x))
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "fsdp"))

    def base_sharding(a):
        if a.ndim in (2, 4) and a.shape[-1] % 4 == 0:
            return NamedSharding(mesh, P(*([None] * (a.ndim - 1)), "fsdp"))
        return NamedSharding(mesh, P())

    p_sh = jax.tree.map(base_sharding, params)
    l_sh = L.shardings(lora, p_sh)
    for path, e in L.entries(l_sh).items():
        base = L.flat_params(p_sh)[path + ("kernel",)].spec
        assert e["up"].spec[-1] == base[-1] == "fsdp" and e["down"].spec[-1] is None
    f = jax.jit(lambda p, l, x: L.apply(module, p, l, x),
                in_shardings=(p_sh, l_sh, NamedSharding(mesh, P("data"))))
    lora_dev = jax.device_put(lora, l_sh)
    assert L.entries(lora_dev)[("to_q",)]["up"].sharding.spec == P(None, "fsdp")
    out = f(jax.device_put(params, p_sh), lora_dev, x)
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5 * np.abs(ref).max())
    pm = jax.pmap(lambda l, x: L.apply(module, params, l, x), in_axes=(None, 0))
    out_pmap = np.asarray(pm(lora, x.reshape((8, 1) + x.shape[1:]))).reshape(ref.shape)
    np.testing.assert_allclose(out_pmap, ref, atol=1e-5 * np.abs(ref).max())
    # logical names for the train loop's sharding rules: down keeps the input axis
    boxed = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), x[:1]))["params"]
    named = flax.traverse_util.flatten_dict(L.logical_partitioning(lora, boxed))
    assert named[("to_q", "down")].names == ("embed", None)
    assert named[("to_q", "up")].names == (None, "mlp")
    assert named[("conv1", "up")].names == (None, None, None, "conv_out")


# ----------------------------------------------------------------------------- bitstream
def test_pack_roundtrip_sizes_and_errors():
    _, params = model()
    lora = random_lora(params, LOCON, rank=4)
    rows = lora_pack.quantization_report(lora)
    by_bits = {r["bits"]: r for r in rows}
    assert by_bits[16]["rel_delta_error"] < 1e-3
    assert by_bits[16]["rel_delta_error"] < by_bits[8]["rel_delta_error"] < 0.02
    assert by_bits[8]["rel_delta_error"] < by_bits[4]["rel_delta_error"] < 0.3
    assert by_bits[4]["bytes"] < by_bits[8]["bytes"] < by_bits[16]["bytes"]
    # entropy coding: below 4 bits per number + the float16 scales + the header
    n = L.num_params(lora)
    n_scales = sum(e[k].shape[-1] for e in L.entries(lora).values() for k in ("down", "up"))
    data4 = L.pack(lora, bits=4)
    header = int.from_bytes(data4[10:14], "little")
    assert len(data4) - header - 22 < 4 * n / 8 + 2 * n_scales
    data = L.pack(lora, bits=8)
    back = L.unpack(data, like=params)
    assert jax.tree.structure(back) == jax.tree.structure(jax.tree.map(np.asarray, lora))
    for path, e in L.entries(back).items():
        ref = np.asarray(L.entries(lora)[path]["down"])
        assert np.abs(e["down"] - ref).max() <= np.abs(ref).max() / 127 * 0.51 + 1e-6
    with pytest.raises(TruncatedError):
        L.unpack(data[:-7])
    with pytest.raises(TruncatedError):
        L.unpack(data[:9])
    with pytest.raises(CorruptError):
        L.unpack(data + b"\0")
    broken = bytearray(data)
    broken[len(data) // 2] ^= 0x10
    with pytest.raises(CorruptError):
        L.unpack(bytes(broken))
    with pytest.raises(BitstreamError):
        L.unpack(b"XXXX" + data[4:])
    other = build_model(dict(TINY, cross_attention_dim=16))
    other_params = flax.traverse_util.unflatten_dict(param_template(other))
    with pytest.raises(WrongModelError):
        L.unpack(data, like=other_params)
    with pytest.raises(WrongModelError):
        L.unpack(data, like=random_lora(params, ATTN))
    with pytest.raises(InputError):
        L.pack(lora, bits=6)
    nan = jax.tree.map(lambda a: a * np.nan, lora)
    with pytest.raises(InputError, match="non-finite"):
        L.pack(nan)
