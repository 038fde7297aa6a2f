"""Test configuration shared by the whole suite.

JAX is told to fake 8 CPU devices *before* it is imported anywhere, so sharded code
paths (mesh over data/fsdp, pmap) run on this CPU exactly as on a pod slice.
"""
import os

_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The CLI's persistent compilation cache stays off in tests (tests/test_cache.py turns it
# on in subprocesses with a temporary folder), so the suite never writes to ~/.cache.
os.environ["DIFFJAX_COMPILATION_CACHE"] = "0"
# Deterministic, quiet torch reference runs.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    """``../shared/data`` beside the checkout (Kodak, BSDS500, clips, TAEF2)."""
    if not SHARED_DATA.is_dir():
        pytest.fail(f"{SHARED_DATA} is missing: the tests need the shared offline data")
    return SHARED_DATA
