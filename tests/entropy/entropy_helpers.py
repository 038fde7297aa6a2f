"""Test helpers shared by tests/entropy, tests/models and tests/codecs (they add this
directory to ``sys.path``): CompressAI import without torchvision, a numpy reference of
the coder-consistent likelihood, and a quick-compiling ``jit`` for test-only functions.

Import CompressAI (the reference implementation) without torchvision:

CompressAI 1.2.8 imports ``torchvision``, ``torch_geometric`` and ``pandas`` at package
import time for datasets and transforms the parity tests never touch; torchvision cannot
load beside the disk torch build. A meta-path finder serves inert stub modules for
exactly those packages (pandas only when it is not installed) while CompressAI imports,
then removes itself and the stubs again.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types

_ALWAYS_STUB = ("torchvision", "torch_geometric")


class _Dummy:
    """Stands in for any attribute of a stubbed module (classes, functions, decorators)."""

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        return _Dummy()

    def __getattr__(self, name):
        return _Dummy()

    def __mro_entries__(self, bases):
        return (object,)


class _StubModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Dummy()


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, roots):
        self.roots = tuple(roots)

    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in self.roots:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        return _StubModule(spec.name)

    def exec_module(self, module):
        module.__path__ = []


def import_compressai():
    """Return the ``compressai`` package, importing it behind the stubs if needed."""
    if "compressai" in sys.modules:
        return sys.modules["compressai"]
    roots = list(_ALWAYS_STUB)
    if importlib.util.find_spec("pandas") is None:
        roots.append("pandas")
    finder = _StubFinder(roots)
    sys.meta_path.insert(0, finder)
    try:
        import compressai  # noqa: F401
        import compressai.entropy_models  # noqa: F401
        import compressai.models  # noqa: F401
    finally:
        # Leave no trace for other tests: they may stub or import these packages themselves.
        sys.meta_path.remove(finder)
        for name in [n for n, m in sys.modules.items() if isinstance(m, _StubModule)]:
            del sys.modules[name]
    return compressai


def coded_likelihood_reference(likelihood, symbols, indexes, table):
    """Numpy reference of the coder-consistent evaluation likelihood (float64).

    ``likelihood``: a reference likelihood at the table scales (e.g. CompressAI's);
    in-range symbols are floored at the smallest table probability, escaped ones get the
    escape cost computed with exact integer arithmetic from the integer ``table``.
    """
    import numpy as np

    sym = np.asarray(symbols, np.int64)
    idx = np.asarray(indexes, np.int64)
    p_min = 2.0 ** -table.precision
    out = np.maximum(np.asarray(likelihood, np.float64), p_min)
    v = sym - table.offsets[idx]
    length = table.lengths[idx]
    esc = (v < 0) | (v >= length)
    w = np.where(v < 0, -2 * v - 1, 2 * (v - length))
    n = np.zeros_like(w)
    for b in range(1, 34):
        n += ((w + 1) >> b) > 0
    p_esc = table.freqs[idx, length] * p_min / 33.0 / 2.0**n
    return np.where(esc, p_esc, out), esc


def fast_jit(fn, **kwargs):
    """``jax.jit`` with XLA's CPU backend optimisation level 0, for test-only functions.

    Compiling the whole hyperprior's gradient drops from ~16 s to ~7 s of CPU; the results
    are the same functions (the tests compare against references with tolerances).
    """
    import jax

    return jax.jit(fn, compiler_options={"xla_backend_optimization_level": 0}, **kwargs)
