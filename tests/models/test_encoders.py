"""EfficientNetV2 (diffjax.models.encoders) against torchvision's own EfficientNet.

The golden file is made by ``tests/data/efficientnet/make_golden.py`` in a separate venv
(torchvision cannot sit beside the suite's torch); see that script.
"""
import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax.convert.efficientnet import convert_efficientnet_state_dict
from diffjax.convert.mapping import CheckpointMismatchError
from diffjax.errors import InputError
from diffjax.nn import cpu_kernels
from diffjax.nn.layers import host_random_params
from diffjax.models.encoders import (V2_S_STAGES, EfficientNetV2, StageConfig,
                                     efficientnet_v2_s_stages, fold_batchnorm, relative_error)

GOLDEN = pathlib.Path(__file__).resolve().parents[1] / "data" / "efficientnet" / "golden.npz"
TOL = 1e-4


@pytest.fixture(scope="module")
def golden():
    data = np.load(GOLDEN)
    cfg = json.loads(str(data["config"]))
    sd = {k[3:]: data[k] for k in data.files if k.startswith("sd/")}
    arrays = {k: data[k] for k in data.files if not k.startswith("sd/") and k != "config"}
    stages = tuple(StageConfig(*s) for s in cfg["stages"])
    return cfg, stages, sd, arrays


def nhwc(a):
    return np.transpose(a, (0, 2, 3, 1))


def test_stage_scaling_matches_torchvision(golden):
    """efficientnet_v2_s_stages(0.25) gives torchvision's adjusted channel numbers."""
    cfg, stages, _, _ = golden
    ours = efficientnet_v2_s_stages(width_mult=0.25)
    assert [(s.in_channels, s.out_channels, s.block, s.stride) for s in ours] == \
        [(s.in_channels, s.out_channels, s.block, s.stride) for s in stages]
    assert EfficientNetV2.v2_s(0.25).last_channels == cfg["last_channels"] == 320
    assert [s.num_layers for s in efficientnet_v2_s_stages(depth_mult=0.25)] == [1, 1, 1, 2, 3, 4]
    assert [s.num_layers for s in V2_S_STAGES] == [2, 4, 4, 6, 9, 15]


def test_golden_parity_batchnorm_and_folded(golden):
    cfg, stages, sd, arrays = golden
    model = EfficientNetV2(stages=stages, last_channels=cfg["last_channels"])
    folded = model.clone(fold_bn=True)
    variables = convert_efficientnet_state_dict(sd, model)
    fvars = convert_efficientnet_state_dict(sd, folded)
    assert set(variables) == {"params", "batch_stats"} and set(fvars) == {"params"}

    @jax.jit
    def run(v, fv, x, x_odd):  # one compilation: every BatchNorm stage; folded, odd size
        out, stage_outs = model.apply(v, x, return_stages=True)
        return out, stage_outs, folded.apply(fv, x_odd)

    x, x_odd = jnp.asarray(nhwc(arrays["x"])), jnp.asarray(nhwc(arrays["x_odd"]))
    # XLA's own convolutions (the CPU kernels compile twice as long; they are checked
    # against XLA in tests/nn)
    with cpu_kernels.override(False):
        out, stage_outs, odd = run(variables, fvars, x, x_odd)
    assert out.shape == (2, 2, 2, 320)
    assert len(stage_outs) == len(stages) + 2
    for i, h in enumerate(stage_outs):
        err = relative_error(h, nhwc(arrays[f"stage_{i}"]))
        assert err <= TOL, (i, err)
    # folded weights, on an input whose size is not a multiple of 32 (ceil at each stride 2)
    assert odd.shape == (1, 2, 2, 320)
    assert relative_error(odd, nhwc(arrays["out_odd"])) <= TOL
    # folding the converted BatchNorm variables gives the same params as converting folded
    refolded = fold_batchnorm(jax.tree_util.tree_map(np.asarray, variables))
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                           refolded, fvars["params"])
    # parity is a real check: a 1 % change of one late project conv breaks it
    bad = dict(sd)
    key = "features.6.1.block.3.0.weight"
    bad[key] = sd[key] * 1.01
    with cpu_kernels.override(False):
        wrong = run(variables, convert_efficientnet_state_dict(bad, folded), x, x_odd)[2]
    assert relative_error(wrong, nhwc(arrays["out_odd"])) > 10 * TOL


def test_converter_layouts_and_strictness(golden):
    cfg, stages, sd, _ = golden
    model = EfficientNetV2(stages=stages, last_channels=cfg["last_channels"], fold_bn=True)
    ref = convert_efficientnet_state_dict(sd, model)
    # model.features.state_dict() layout (no "features." prefix), and a full model's head
    features_only = {k[len("features."):]: v for k, v in sd.items()}
    same = convert_efficientnet_state_dict(features_only, model)
    jax.tree_util.tree_map(np.testing.assert_array_equal, same, ref)
    with_head = dict(sd, **{"classifier.1.weight": np.zeros((10, 320), np.float32),
                            "classifier.1.bias": np.zeros((10,), np.float32)})
    convert_efficientnet_state_dict(with_head, model)

    missing = dict(sd)
    del missing["features.6.1.block.2.fc1.bias"]
    extra = dict(sd, **{"features.6.1.block.9.0.weight": np.zeros((1, 1, 1, 1), np.float32)})
    shaped = dict(sd, **{"features.0.0.weight": np.zeros((8, 3, 5, 5), np.float32)})
    for bad, words in ((missing, ["1 missing", "features_6_1/block_2/fc1/bias"]),
                       (extra, ["1 unexpected", "features.6.1.block.9.0.weight"]),
                       (shaped, ["1 wrong shape", "features.0.0.weight", "(5, 5, 3, 8)"])):
        with pytest.raises(CheckpointMismatchError) as err:
            convert_efficientnet_state_dict(bad, model)
        for word in words:
            assert word in str(err.value), (word, str(err.value))
    # a state dict for a different width lists everything it cannot place
    with pytest.raises(CheckpointMismatchError) as err:
        convert_efficientnet_state_dict(sd, EfficientNetV2.v2_s(0.5, 0.25))
    assert err.value.missing and err.value.mismatched


def test_full_size_structure():
    """Full V2-S: 1280 channels at stride 32, torchvision's parameter and buffer counts."""
    model = EfficientNetV2()
    out, variables = jax.eval_shape(model.init_with_output, jax.random.PRNGKey(0),
                                    jnp.zeros((1, 96, 64, 3)))
    assert out.shape == (1, 3, 2, 1280) and model.reduction == 32
    count = lambda t: sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(t))  # noqa: E731
    assert count(variables["params"]) == 20_177_488  # torchvision features parameters
    assert count(variables["batch_stats"]) == 153_872  # running_mean + running_var


# One stage of two fused blocks: the second has a residual (stochastic depth).
TINY = (StageConfig("fused", 4, 3, 1, 8, 8, 2),)


def test_training_mode_and_errors():
    model = EfficientNetV2(stages=TINY, last_channels=32, stochastic_depth_prob=0.5)
    x = np.random.default_rng(0).normal(1.0, 2.0, (4, 16, 16, 3)).astype(np.float32)
    shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(1), x))
    variables = {"params": host_random_params(shapes["params"], seed=1),  # no init compile
                 "batch_stats": jax.tree_util.tree_map(
                     lambda a: np.ones(a.shape, a.dtype), shapes["batch_stats"])}

    @jax.jit
    def train(v, key):
        return model.apply(v, x, train=True, mutable=["batch_stats"], rngs={"dropout": key})

    with cpu_kernels.override(False):  # BatchNorm and stochastic depth are under test here,
        y, updates = train(variables, jax.random.PRNGKey(2))  # not the convs: compile faster
    assert y.shape == (4, 8, 8, 32)
    # the stem's running mean moves towards the batch mean (torch momentum 0.1)
    k = variables["params"]["features_0"]["conv"]["kernel"]  # stem: 3x3 stride 2, pad 1
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    h = sum(np.einsum("bhwc,cd->bhwd", xp[:, i:i + 16:2, j:j + 16:2], k[i, j])
            for i in range(3) for j in range(3))
    np.testing.assert_allclose(updates["batch_stats"]["features_0"]["bn"]["mean"],
                               0.9 + 0.1 * np.asarray(h).mean(axis=(0, 1, 2)), rtol=1e-4,
                               atol=1e-6)
    # stochastic depth: the dropout key matters in training, not at inference
    with cpu_kernels.override(False):
        y2, _ = train(variables, jax.random.PRNGKey(3))
    assert not np.allclose(y, y2)
    with pytest.raises(InputError, match="cannot train"):
        model.clone(fold_bn=True).apply({"params": {}}, x, train=True)
    with pytest.raises(InputError, match=r"\[B, H, W, 3\]"):
        model.apply(variables, x[..., :1])
    with pytest.raises(InputError):
        StageConfig("fused", 1, 3, 3, 8, 8, 1)
    with pytest.raises(InputError):
        efficientnet_v2_s_stages(width_mult=0)
