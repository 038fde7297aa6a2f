"""Full-size EfficientNetV2-S parity with torchvision (slow tier; also a script).

The reference (80 MB) is not committed: ``tests/data/efficientnet/make_golden.py
--full-size`` writes it in a venv that has torchvision (``/tmp/tv``, see that script).
This test makes it when the venv exists and skips, saying so, when neither the reference
nor the venv is there. As a script it prints the measured errors::

    /tmp/tv/bin/python tests/data/efficientnet/make_golden.py --full-size /tmp/effv2s_full.npz
    python tests/models/test_encoders_full_size.py /tmp/effv2s_full.npz
"""
import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
REFERENCE = pathlib.Path("/tmp/effv2s_full.npz")
VENV_PYTHON = pathlib.Path("/tmp/tv/bin/python")


def measure(path: pathlib.Path) -> dict:
    import jax

    from diffjax.convert.efficientnet import convert_efficientnet_state_dict
    from diffjax.models.encoders import EfficientNetV2, relative_error

    data = np.load(path)
    sd = {k[3:]: data[k] for k in data.files if k.startswith("sd/")}
    x = np.transpose(data["x"], (0, 2, 3, 1))
    ref = np.transpose(data["y"], (0, 2, 3, 1))
    result = {}
    for fold in (False, True):
        model = EfficientNetV2(fold_bn=fold)
        out = np.asarray(jax.jit(model.apply)(convert_efficientnet_state_dict(sd, model), x))
        assert out.shape == ref.shape == (1, 7, 7, 1280)
        diff = np.abs(out.astype(np.float64) - ref)
        result["folded" if fold else "batchnorm"] = {
            "max_rel": relative_error(out, ref), "max_abs": float(diff.max()),
            "max_over_rms": float(diff.max() / np.sqrt(np.mean(ref.astype(np.float64) ** 2))),
            "ref_max": float(np.abs(ref).max())}
    return result


@pytest.mark.slow
def test_full_size_parity():
    if not REFERENCE.exists():
        if not VENV_PYTHON.exists():
            pytest.skip("needs /tmp/effv2s_full.npz or the torchvision venv /tmp/tv "
                        "(see tests/data/efficientnet/make_golden.py)")
        subprocess.run([str(VENV_PYTHON), str(ROOT / "tests/data/efficientnet/make_golden.py"),
                        "--full-size", str(REFERENCE)], check=True)
    result = measure(REFERENCE)
    for mode in result.values():
        assert mode["max_rel"] <= 1e-4, result


if __name__ == "__main__":
    print(measure(pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else REFERENCE))
