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
