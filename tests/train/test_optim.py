"""The optax optimizer factory (``diffjax.train.optim``), checked against direct optax /
closed-form computation: warmup + cosine (and linear, constant) schedules at known steps,
gradient clipping per label group, ``train_only`` (LoRA-like), ``freeze`` (frozen
backbone), per-group learning rates, AdamW weight decay, config errors.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from diffjax.errors import InputError
from diffjax.train import optim

LR = 1e-2


def tree(seed=0):
    """A LoRA-like parameter tree: a "backbone" and small adapters inside it."""
    k = iter(jax.random.split(jax.random.PRNGKey(seed), 8))
    return {
        "unet": {"Conv_0": {"kernel": jax.random.normal(next(k), (3, 3, 2, 4)),
                            "bias": jax.random.normal(next(k), (4,))},
                 "attn": {"to_q": {"kernel": jax.random.normal(next(k), (4, 4)),
                                   "lora_down": jax.random.normal(next(k), (4, 2)),
                                   "lora_up": jax.random.normal(next(k), (2, 4))}}},
        "head": {"kernel": jax.random.normal(next(k), (4, 3)),
                 "layers": [jax.random.normal(next(k), (3,)), jax.random.normal(next(k), (2,))]},
    }


def step(tx, params, grads, n=1):
    state = tx.init(params)
    for _ in range(n):
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return params, state


def changed(before, after):
    """``{path: bool}``: which leaves changed."""
    flat_b = jax.tree_util.tree_flatten_with_path(before)[0]
    flat_a = jax.tree.leaves(after)
    return {optim.path_string(p): not np.array_equal(b, a) for (p, b), a in zip(flat_b, flat_a)}


def assert_trees_close(a, b, **kw):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **kw)


# ----------------------------------------------------------------------------- schedules


def test_warmup_cosine_schedule_values():
    cfg = dict(learning_rate=LR, warmup_steps=10, schedule="cosine",
               end_learning_rate_factor=0.1)
    sched = optim.make_schedule(cfg, num_train_steps=110)  # decay over the 100 after warmup
    end = 0.1 * LR
    want = {0: 0.0, 5: LR / 2, 10: LR, 60: end + (LR - end) / 2,
            35: end + (LR - end) * 0.5 * (1 + math.cos(math.pi * 25 / 100)),
            110: end, 500: end}
    for s, v in want.items():
        np.testing.assert_allclose(float(sched(s)), v, rtol=1e-5, atol=1e-12, err_msg=f"step {s}")
    ref = optax.warmup_cosine_decay_schedule(0.0, LR, 10, 110, end)
    steps = jnp.arange(0, 120)
    np.testing.assert_allclose(sched(steps), ref(steps), rtol=1e-6)
    # decay_steps overrides num_train_steps; no warmup starts at the peak
    sched = optim.make_schedule(dict(learning_rate=LR, decay_steps=20), num_train_steps=1000)
    np.testing.assert_allclose([float(sched(0)), float(sched(10)), float(sched(20))],
                               [LR, LR / 2, 0.0], atol=1e-9)


def test_linear_and_constant_schedules():
    lin = optim.make_schedule(dict(learning_rate=LR, warmup_steps=4, schedule="linear"), 14)
    np.testing.assert_allclose([float(lin(s)) for s in (0, 2, 4, 9, 14, 20)],
                               [0, LR / 2, LR, LR / 2, 0, 0], atol=1e-9)
    const = optim.make_schedule(dict(learning_rate=LR, schedule="constant"), 100)
    assert float(const(0)) == float(const(99)) == pytest.approx(LR)
    warm = optim.make_schedule(dict(learning_rate=LR, warmup_steps=4, schedule="constant"), 100)
    np.testing.assert_allclose([float(warm(s)) for s in (0, 1, 4, 50)], [0, LR / 4, LR, LR],
                               atol=1e-9)
    with pytest.raises(InputError, match="unknown learning-rate schedule"):
        optim.make_schedule(dict(learning_rate=LR, schedule="step"), 10)


def test_optimizer_follows_the_schedule():
    """SGD updates are ``-lr(step) * g``: step k of the optimizer uses ``schedule(k)``."""
    cfg = dict(name="sgd", learning_rate=LR, warmup_steps=2, grad_clip_norm=0.0)
    tx = optim.make_optimizer(cfg, num_train_steps=6)
    sched = optim.make_schedule(cfg, 6)
    p = {"w": jnp.ones(3)}
    g = {"w": jnp.full(3, 2.0)}
    state = tx.init(p)
    for k in range(6):
        updates, state = tx.update(g, state, p)
        np.testing.assert_allclose(updates["w"], -float(sched(k)) * 2.0, rtol=1e-6, atol=1e-12)


# ----------------------------------------------------------------------------- optimizers


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_single_group_matches_optax(name):
    params, grads = tree(0), tree(1)
    cfg = dict(name=name, learning_rate=LR, warmup_steps=3, grad_clip_norm=0.5, b1=0.8,
               b2=0.99, eps=1e-6, weight_decay=0.05)
    if name == "adam":
        cfg.pop("weight_decay")
    sched = optax.warmup_cosine_decay_schedule(0.0, LR, 3, 20, 0.0)
    if name == "adam":
        ref_opt = optax.adam(sched, b1=0.8, b2=0.99, eps=1e-6)
    else:
        ref_opt = optax.adamw(sched, b1=0.8, b2=0.99, eps=1e-6, weight_decay=0.05)
    ref = optax.chain(optax.clip_by_global_norm(0.5), ref_opt)
    for labels in (None, jax.tree.map(lambda _: optim.TRAINABLE, params)):
        got, _ = step(optim.make_optimizer(cfg, 20, labels), params, grads, n=4)
        want, _ = step(ref, params, grads, n=4)
        assert_trees_close(got, want, rtol=1e-6, atol=1e-7)


def test_adamw_weight_decay_is_decoupled():
    """With zero gradients Adam moves nothing and AdamW shrinks by ``lr * wd * p``."""
    params = tree(0)
    zeros = jax.tree.map(jnp.zeros_like, params)
    base = dict(learning_rate=LR, schedule="constant", grad_clip_norm=0.0)
    adam, _ = step(optim.make_optimizer(dict(base, name="adam"), 10), params, zeros)
    assert_trees_close(adam, params, rtol=0, atol=0)
    adamw, _ = step(optim.make_optimizer(dict(base, name="adamw", weight_decay=0.1), 10),
                    params, zeros)
    assert_trees_close(adamw, jax.tree.map(lambda p: p * (1 - LR * 0.1), params), rtol=1e-6)
    # the default AdamW decay is 1e-4
    default, _ = step(optim.make_optimizer(dict(base, name="adamw"), 10), params, zeros)
    assert_trees_close(default, jax.tree.map(lambda p: p * (1 - LR * 1e-4), params), rtol=1e-6)


# ----------------------------------------------------------------------------- groups


def group_labels(params):
    """``head`` -> "aux", the rest "trainable" (as the hyperprior labels its quantiles)."""
    return {k: jax.tree.map(lambda _: "aux" if k == "head" else optim.TRAINABLE, v)
            for k, v in params.items()}


def test_clipping_is_per_group():
    """Global-norm clipping runs inside each label group: a huge gradient in one group
    does not shrink the other group's update (CompressAI clips only the main optimizer)."""
    params = tree(0)
    grads = {"unet": jax.tree.map(lambda p: 1e-3 * jnp.ones_like(p), params["unet"]),
             "head": jax.tree.map(lambda p: 100.0 * jnp.ones_like(p), params["head"])}
    cfg = dict(name="sgd", learning_rate=1.0, schedule="constant", grad_clip_norm=1.0)
    tx = optim.make_optimizer(cfg, 10, group_labels(params))
    updates, _ = tx.update(grads, tx.init(params), params)
    unet_norm = optax.global_norm(grads["unet"])
    assert float(unet_norm) < 1.0
    assert_trees_close(updates["unet"], jax.tree.map(lambda g: -g, grads["unet"]), rtol=1e-6)
    np.testing.assert_allclose(float(optax.global_norm(updates["head"])), 1.0, rtol=1e-5)
    clipped, _ = optax.clip_by_global_norm(1.0).update(grads["head"], None)
    assert_trees_close(updates["head"], jax.tree.map(lambda g: -g, clipped), rtol=1e-6)
    # a group can switch clipping off (the hyperprior's aux group does)
    tx = optim.make_optimizer(dict(cfg, groups={"aux": {"grad_clip_norm": 0.0}}), 10,
                              group_labels(params))
    updates, _ = tx.update(grads, tx.init(params), params)
    assert_trees_close(updates["head"], jax.tree.map(lambda g: -g, grads["head"]), rtol=1e-6)


def test_group_learning_rate_override_matches_optax():
    params, grads = tree(0), tree(1)
    cfg = dict(name="adam", learning_rate=LR, warmup_steps=2, grad_clip_norm=0.0,
               groups={"aux": {"learning_rate": 10 * LR, "schedule": "constant"}})
    got, _ = step(optim.make_optimizer(cfg, 10, group_labels(params)), params, grads, n=3)
    main = optax.adam(optax.warmup_cosine_decay_schedule(0.0, LR, 2, 10, 0.0))
    aux = optax.adam(optax.join_schedules([optax.linear_schedule(0.0, 10 * LR, 2),
                                           optax.constant_schedule(10 * LR)], [2]))
    want_unet, _ = step(main, params["unet"], grads["unet"], n=3)
    want_head, _ = step(aux, params["head"], grads["head"], n=3)
    assert_trees_close(got["unet"], want_unet, rtol=1e-6, atol=1e-7)
    assert_trees_close(got["head"], want_head, rtol=1e-6, atol=1e-7)


def test_group_errors():
    params = tree(0)
    cfg = dict(learning_rate=LR, groups={"aux": {"learning_rate": 1.0},
                                         "ema": {"learning_rate": 1.0}})
    with pytest.raises(InputError, match=r"groups \['ema'\] match no parameter label"):
        optim.make_optimizer(cfg, 10, group_labels(params))
    with pytest.raises(InputError, match="match no parameter label"):
        optim.make_optimizer(dict(learning_rate=LR, groups={"aux": {}}), 10, None)
    with pytest.raises(InputError, match="unknown optimizer option"):
        optim.make_optimizer(dict(learning_rate=LR, lr_decay=0.1), 10)
    with pytest.raises(InputError, match="unknown optimizer 'lion'"):
        optim.make_optimizer(dict(learning_rate=LR, name="lion"), 10)


# ----------------------------------------------------------------------------- frozen


def test_train_only_updates_only_the_matching_subtree():
    """LoRA: ``train_only=[r"lora_"]``; the rest gets no update and no Adam moments."""
    params, grads = tree(0), tree(1)
    labels = optim.path_labels(params, train_only=[r"lora_"])
    cfg = dict(name="adamw", learning_rate=LR, weight_decay=0.1, warmup_steps=0)
    new, state = step(optim.make_optimizer(cfg, 10, labels), params, grads, n=2)
    diff = changed(params, new)
    assert {k for k, v in diff.items() if v} == {"unet/attn/to_q/lora_down",
                                                 "unet/attn/to_q/lora_up"}
    # optimizer state holds moments for the 2 adapter leaves only (set_to_zero: no state)
    sizes = {int(np.size(x)) for x in jax.tree.leaves(state) if np.ndim(x) > 0}
    assert sizes == {8}
    n_state = sum(int(np.size(x)) for x in jax.tree.leaves(state) if np.ndim(x) > 0)
    assert n_state == 2 * (8 + 8)  # mu and nu of lora_down (4x2) and lora_up (2x4)
    # and the adapters moved exactly as a lone AdamW on them would
    lora = lambda t: t["unet"]["attn"]["to_q"]  # noqa: E731
    ref = optax.adamw(optax.cosine_decay_schedule(LR, 10, 0.0), weight_decay=0.1)
    ref = optax.chain(optax.clip_by_global_norm(1.0), ref)
    sub = {k: v for k, v in lora(params).items() if k.startswith("lora")}
    want, _ = step(ref, sub, {k: v for k, v in lora(grads).items() if k.startswith("lora")}, n=2)
    assert_trees_close({k: lora(new)[k] for k in want}, want, rtol=1e-6, atol=1e-7)


def test_freeze_keeps_the_backbone_fixed():
    params, grads = tree(0), tree(1)
    labels = optim.path_labels(params, freeze=[r"^unet/", r"layers/1$"])
    new, _ = step(optim.make_optimizer(dict(learning_rate=LR), 10, labels), params, grads)
    diff = changed(params, new)
    assert {k for k, v in diff.items() if v} == {"head/kernel", "head/layers/0"}


def test_path_labels_refine_task_labels_and_refuse_to_freeze_everything():
    params = tree(0)
    labels = optim.path_labels(params, freeze=[r"Conv_0/bias"], base=group_labels(params))
    assert labels["head"]["kernel"] == "aux"  # task label kept
    assert labels["unet"]["Conv_0"]["bias"] == optim.FROZEN
    assert labels["unet"]["Conv_0"]["kernel"] == optim.TRAINABLE
    with pytest.raises(InputError, match="freeze every parameter"):
        optim.path_labels(params, train_only=[r"no_such_param"])
    with pytest.raises(InputError, match="freeze every parameter"):
        optim.path_labels(params, freeze=[r"."])


def test_frozen_step_is_jittable():
    """The multi_transform optimizer works under jit with labels closed over."""
    params, grads = tree(0), tree(1)
    labels = optim.path_labels(params, train_only=[r"^head/"])
    tx = optim.make_optimizer(dict(learning_rate=LR, warmup_steps=1), 10, labels)

    @jax.jit
    def update(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    eager, _ = step(tx, params, grads, n=2)
    p, s = params, tx.init(params)
    for _ in range(2):
        p, s = update(p, s, grads)
    assert_trees_close(p, eager, rtol=1e-6, atol=1e-7)
    assert_trees_close(p["unet"], params["unet"], rtol=0, atol=0)
