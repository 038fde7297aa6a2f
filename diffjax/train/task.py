"""The task interface: how a codec plugs into the generic train loop.

A task is a small object built from ``config.task`` that owns the model and the loss::

    class MyTask(Task):
        def init_params(self, rng, batch_spec):     # dict of jax.ShapeDtypeStruct
            x = jnp.zeros((1,) + batch_spec["image"].shape[1:])
            return model.init({"params": rng}, x)["params"]
        def loss_fn(self, params, batch, rng, step):  # -> (scalar loss, {name: scalar})
            ...
        def param_labels(self, params):             # optional: "frozen" / "trainable" / ...
            ...

* ``init_params`` gets the global batch layout (shapes and dtypes only) and runs under
  ``jax.eval_shape`` first (to derive shardings) and then under ``jax.jit`` with
  ``out_shardings``, so parameters are created already sharded.
  It may return parameters boxed with ``nn.with_logical_partitioning``.
* ``loss_fn`` is pure and jittable; ``rng`` is derived by the loop from the root key
  (``fold_in(root, step)``, then per example, see below); ``step`` is a traced int.
* ``param_labels`` returns a label tree (see :mod:`diffjax.train.optim`): frozen
  subtrees (a frozen SD backbone) or only-trained subtrees (LoRA adapters).
* ``per_example_rng`` (default ``True``): the loop calls ``loss_fn`` on each example
  (a batch of one, ``jax.vmap``-ed, which XLA turns back into one batched computation)
  with the key ``fold_in(fold_in(root, step), global_example_index)`` and averages. The
  noise an example sees then does not depend on how the batch is split over devices,
  which is what makes the data-parallel jit step, the single-device step and the pmap
  step agree for stochastic losses (additive quantisation noise, diffusion timesteps).
  Tasks whose loss couples examples (batch statistics, contrastive terms) set it to
  ``False`` and receive the whole (per-device, under pmap) batch and one key.

**The codec a task trains** (one convention for every task, read by
:func:`diffjax.codecs.load`, ``experiments/export.py``, ``diffjax eval`` and the CLI's
``--model WORKDIR``): ``codec_name`` is the registered codec name (``None`` for tasks
that train no codec, e.g. a backbone or adapters), :meth:`Task.codec_kwargs` its
constructor arguments, :meth:`Task.codec_params` the codec's parameters from the trained
ones, :meth:`Task.provenance` what the exported ``model.json`` records about training.

**Model state** (e.g. BatchNorm running statistics): a task whose network keeps mutable
collections besides its parameters sets ``stateful = True``, returns their initial
values from :meth:`Task.init_model_state` and takes and returns them in its loss:
``loss_fn(params, batch, rng, step, model_state) -> (loss, metrics, new_model_state)``.
The train state carries them (``TrainState.model_state``, checkpointed and restored
with the rest), the step replaces them with the loss's new values (averaged over devices
under pmap, as flax's ImageNet example does with its batch statistics; under ``jit`` the
batch statistics are those of the global batch), and the optimizer never sees them.
A stateful loss couples the examples of a batch, so ``per_example_rng`` must be
``False``. :meth:`Task.merge_model_state` puts them back into the codec's parameter tree
(default: a nested-dict merge, so a state ``{"encoder": {"batch_stats": ...}}`` beside
params ``{"encoder": {"params": ...}}`` gives the Flax variables ``{"encoder": {"params",
"batch_stats"}}``); exports and ``--model WORKDIR`` read them.

Tasks are registered by name in :data:`TASKS` (``name -> "module:attribute"``, imported
lazily), like the CLI's command registry; later codecs add one line each.
"""
from __future__ import annotations

import importlib
from typing import Any, ClassVar, Mapping

import jax
import jax.numpy as jnp

from diffjax.errors import InputError

TASKS: dict[str, str] = {
    "toy_autoencoder": "diffjax.train.toy:ToyAutoencoderTask",
    "rate_distortion": "diffjax.train.rate_distortion:RateDistortionTask",
    "residual": "diffjax.codecs.residual_train:ResidualTask",
    "residual_video": "diffjax.codecs.residual_video_train:ResidualVideoTask",
    "foundation": "diffjax.codecs.foundation:FoundationTask",
    "latent_denoiser": "diffjax.codecs.latent_denoiser:LatentDenoiserTask",
    "controlnet": "diffjax.train.controlnet:ControlNetTask",
    "lora_finetune": "diffjax.train.lora_finetune:LoraFinetuneTask",
    "video_denoiser": "diffjax.train.video:VideoDenoiserTask",
    "diffae": "diffjax.codecs.diffae_train:DiffAETask",
    "diffae_video": "diffjax.codecs.diffae_train:DiffAEVideoTask",
}


class Task:
    """Base class of training tasks (see the module docstring)."""

    per_example_rng: bool = True
    stateful: ClassVar[bool] = False
    codec_name: ClassVar[str | None] = None

    def codec_kwargs(self) -> dict:
        """Constructor arguments of :attr:`codec_name` for the model this task trains."""
        raise NotImplementedError(f"{type(self).__name__} trains no codec")

    def codec_params(self, params: Any) -> Any:
        """The codec's parameters from the trained ones (default: all of them)."""
        return params

    def provenance(self) -> dict:
        """JSON-able facts about training for the exported ``model.json``."""
        return {}

    def init_params(self, rng: jax.Array, batch_spec: Mapping[str, Any]) -> Any:
        raise NotImplementedError

    def loss_fn(self, params: Any, batch: Mapping[str, jax.Array], rng: jax.Array,
                step: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        raise NotImplementedError

    def param_labels(self, params: Any) -> Any:
        """Label tree for the optimizer; ``None`` = every parameter trains."""
        return None

    def init_model_state(self, rng: jax.Array, batch_spec: Mapping[str, Any]) -> Any:
        """Initial non-parameter collections (``stateful`` tasks); ``{}`` by default."""
        return {}

    def merge_model_state(self, params: Any, model_state: Any) -> Any:
        """Trained ``params`` with the ``model_state`` put back (a nested-dict merge)."""
        return merge_trees(params, model_state)


def build_task(cfg: Mapping[str, Any]) -> Task:
    """Instantiate ``TASKS[cfg["name"]](**cfg["kwargs"])``."""
    name = cfg.get("name")
    if name not in TASKS:
        raise InputError(f"unknown task {name!r}; available: {', '.join(sorted(TASKS))}")
    module_name, attr = TASKS[name].split(":")
    factory = getattr(importlib.import_module(module_name), attr)
    kwargs = dict(cfg.get("kwargs") or {})
    try:
        return factory(**kwargs)
    except TypeError as err:
        raise InputError(f"task {name!r}: bad arguments {sorted(kwargs)}: {err}") from err


def merge_trees(base: Any, extra: Any) -> Any:
    """Nested dicts: ``base`` with the keys of ``extra`` added (recursively); a key present
    in both with a non-dict value is an error."""
    if not extra:
        return base
    out = dict(base)
    for key, value in dict(extra).items():
        if key in out and isinstance(out[key], Mapping) and isinstance(value, Mapping):
            out[key] = merge_trees(out[key], value)
        elif key in out:
            raise InputError(f"model state key {key!r} clashes with a parameter")
        else:
            out[key] = value
    return out


def split_tree(tree: Any, like: Any) -> tuple[Any, Any]:
    """Inverse of :func:`merge_trees`: ``(tree without the keys of like, those keys)``."""
    if not like or not isinstance(tree, Mapping):
        return tree, {}
    rest, taken = dict(tree), {}
    for key, sub in dict(like).items():
        if key not in rest:
            continue
        if isinstance(sub, Mapping) and sub and isinstance(rest[key], Mapping) and \
                set(rest[key]) - set(sub):
            rest[key], taken[key] = split_tree(rest[key], sub)
        else:
            taken[key] = rest.pop(key)
    return rest, taken


def batch_size_of(batch: Mapping[str, Any]) -> int:
    sizes = {x.shape[0] for x in jax.tree.leaves(batch)}
    if len(sizes) != 1:
        raise InputError(f"batch leaves disagree on the batch size: {sorted(sizes)}")
    return sizes.pop()


def task_loss(task: Task, params: Any, batch: Mapping[str, jax.Array], rng: jax.Array,
              step: jax.Array, example_offset: jax.Array | int = 0):
    """Mean loss and metrics over ``batch`` with the RNG convention of the module docstring.

    ``example_offset`` is the global index of the first example of ``batch`` (non-zero
    on all but the first device of a pmap).
    """
    if not task.per_example_rng:
        return task.loss_fn(params, batch, rng, step)
    n = batch_size_of(batch)
    ids = jnp.asarray(example_offset, jnp.int32) + jnp.arange(n, dtype=jnp.int32)
    keys = jax.vmap(jax.random.fold_in, (None, 0))(rng, ids)

    def one(example, key):
        return task.loss_fn(params, jax.tree.map(lambda a: a[None], example), key, step)

    losses, metrics = jax.vmap(one)(batch, keys)
    return jnp.mean(losses), jax.tree.map(jnp.mean, metrics)


def task_loss_and_state(task: Task, params: Any, batch: Mapping[str, jax.Array],
                        rng: jax.Array, step: jax.Array, example_offset: jax.Array | int = 0,
                        model_state: Any = None):
    """``(loss, (metrics, new_model_state))``: :func:`task_loss` for every task, with the
    model state passed through (unchanged for tasks that are not ``stateful``)."""
    if not task.stateful:
        loss, metrics = task_loss(task, params, batch, rng, step, example_offset)
        return loss, (metrics, model_state if model_state is not None else {})
    if task.per_example_rng:
        raise InputError(f"{type(task).__name__} is stateful (batch statistics couple the "
                         "examples): set per_example_rng = False")
    loss, metrics, new_state = task.loss_fn(params, batch, rng, step, model_state)
    return loss, (metrics, new_state)
