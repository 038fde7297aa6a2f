"""Device meshes and shardings shared by training, sampling and decoding.

Modules only know *logical* axis names (``"batch"``, ``"embed"``, ``"mlp"``, ...); the
mesh and the rules mapping logical to mesh axes live in config. This is the modern form
of ``pjit``: callers ``jax.jit`` with ``in_shardings``/``out_shardings`` built here.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# Mesh axes over which the batch dimension is split (data parallel + fully sharded).
BATCH_AXES = ("data", "fsdp")

# Logical axis name -> mesh axis (or None = replicated). Parameters annotated with
# ``nn.with_logical_partitioning`` are split along "fsdp" on their largest dimension.
DEFAULT_LOGICAL_AXIS_RULES: tuple[tuple[str, str | None], ...] = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("mlp", None),
    ("heads", None),
    ("kv", None),
    ("conv_in", None),
    ("conv_out", "fsdp"),
    ("height", None),
    ("width", None),
    ("time", None),
    ("channels", None),
)


def make_mesh(axes: Mapping[str, int] | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Build a ``Mesh`` from ``{axis_name: size}``; one size may be ``-1`` (= the rest).

    ``make_mesh({"data": -1, "fsdp": 1})`` puts every device on the data axis.
    """
    axes = dict(axes or {"data": -1, "fsdp": 1})
    devices = list(devices if devices is not None else jax.devices())
    sizes = list(axes.values())
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {axes}")
    known = int(np.prod([s for s in sizes if s != -1])) if sizes else 1
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices cannot fill mesh {axes}")
        sizes[sizes.index(-1)] = len(devices) // known
    total = int(np.prod(sizes))
    if total > len(devices):
        raise ValueError(f"mesh {dict(zip(axes, sizes))} needs {total} devices, "
                         f"only {len(devices)} available")
    grid = np.asarray(devices[:total], dtype=object).reshape(sizes)
    return Mesh(grid, tuple(axes))


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes the leading batch dimension is split over."""
    return tuple(a for a in BATCH_AXES if a in mesh.axis_names)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of an array whose leading dimension is the batch."""
    return NamedSharding(mesh, P(batch_axes(mesh)))


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding of an array copied to every device (e.g. small parameters)."""
    return NamedSharding(mesh, P())


# --------------------------------------------------------------------------------------
# Parameter / train-state shardings (added by the training infrastructure).


def logical_param_shardings(abstract_params, mesh: Mesh,
                            rules: Sequence[tuple[str, object]] | None = None,
                            fsdp_min_size: int = 0):
    """Mesh shardings of a (possibly logically annotated) parameter tree.

    ``abstract_params`` is what ``jax.eval_shape(model.init, ...)`` returns: leaves that
    were created with ``nn.with_logical_partitioning`` are boxed and carry logical axis
    names, which ``rules`` (default :data:`DEFAULT_LOGICAL_AXIS_RULES`) map to mesh axes.
    With ``fsdp_min_size > 0``, unannotated leaves of at least that many elements are
    additionally split over the ``"fsdp"`` axis on their largest divisible dimension
    (ZeRO-3 style), so models without annotations still shard. Returns a tree of
    ``NamedSharding`` with the structure of the *unboxed* parameters.
    """
    import flax.linen as nn

    rules = tuple(rules) if rules is not None else DEFAULT_LOGICAL_AXIS_RULES
    specs = nn.get_partition_spec(abstract_params)
    shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
    unboxed = nn.meta.unbox(abstract_params)
    fsdp = mesh.shape.get("fsdp", 1)
    if fsdp_min_size <= 0 or fsdp == 1:
        return shardings

    def auto(leaf, sharding):
        if tuple(sharding.spec) or int(np.prod(leaf.shape)) < fsdp_min_size:
            return sharding
        dims = sorted(range(len(leaf.shape)), key=lambda d: -leaf.shape[d])
        for d in dims:
            if leaf.shape[d] % fsdp == 0:
                spec = [None] * len(leaf.shape)
                spec[d] = "fsdp"
                return NamedSharding(mesh, P(*spec))
        return sharding

    return jax.tree.map(auto, unboxed, shardings)


def match_param_shardings(abstract_tree, abstract_params, param_shardings, default):
    """Shardings for a tree that *contains* copies of the parameters (optimizer moments,
    EMA weights): a leaf whose key path ends with a parameter's key path and has that
    parameter's shape gets the parameter's sharding; every other leaf gets ``default``.

    Works for any optax state (``multi_transform``, masked, chained) because it relies
    only on optax keeping the parameter tree structure inside its state.
    """
    from jax.tree_util import tree_flatten_with_path

    by_path = {}
    for (path, leaf), sharding in zip(tree_flatten_with_path(abstract_params)[0],
                                      jax.tree.leaves(param_shardings)):
        by_path[tuple(path)] = (tuple(leaf.shape), sharding)
    lengths = sorted({len(p) for p in by_path}, reverse=True)

    def pick(path, leaf):
        path = tuple(path)
        for n in lengths:
            if n <= len(path) and path[-n:] in by_path:
                shape, sharding = by_path[path[-n:]]
                if shape == tuple(getattr(leaf, "shape", ())):
                    return sharding
        return default

    return jax.tree_util.tree_map_with_path(pick, abstract_tree)
