"""JAX's persistent compilation cache for the ``diffjax`` command (warm starts).

Every ``diffjax compress`` / ``decompress`` is a fresh process, and without a cache each one
compiles the codec's networks again (most of a cold run's time on a CPU). The CLI therefore
turns on JAX's persistent compilation cache (``jax_compilation_cache_dir``), so the second
and later processes load the compiled executables from disk. Compiled programs are the same
either way: the cache changes start-up time, never the output.

* Location: ``$DIFFJAX_CACHE_DIR``, else ``$XDG_CACHE_HOME/diffjax``, else
  ``~/.cache/diffjax``; entries go to a ``jax-<version>`` folder inside it.
* Opt out: ``DIFFJAX_COMPILATION_CACHE=0`` (the test suite sets it, so tests never write to
  the user's home). An unwritable location only disables the cache, with no error.

Library code never turns it on by itself; a script may call :func:`enable_compilation_cache`.
"""
from __future__ import annotations

import os
import pathlib

ENV_SWITCH = "DIFFJAX_COMPILATION_CACHE"
ENV_DIR = "DIFFJAX_CACHE_DIR"


def cache_root() -> pathlib.Path:
    """Where diffjax keeps its caches (see the module docstring)."""
    if os.environ.get(ENV_DIR):
        return pathlib.Path(os.environ[ENV_DIR]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "diffjax"


def compilation_cache_enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


def enable_compilation_cache() -> pathlib.Path | None:
    """Turn on JAX's persistent compilation cache; returns its folder (``None`` if disabled
    by the environment or the folder cannot be created)."""
    if not compilation_cache_enabled():
        return None
    import jax

    folder = cache_root() / f"jax-{jax.__version__}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    jax.config.update("jax_compilation_cache_dir", str(folder))
    # cache every compilation: a codec's many small stages add up on a cold start
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return folder
