"""Execute every ``colab/*.ipynb`` and check its structure.

The notebooks are run without Jupyter: the code cells are exec'd in order in one namespace
in a fresh Python process (cwd = the repository root, like a user who starts Jupyter in the
checkout), with IPython lines (``!cmd``, ``%magic``) replaced by ``pass``; the Colab set-up
cell is a no-op outside Colab. The process writes a JSON summary of the final namespace
(shapes of arrays, plain values, caught exceptions), which the tests check per notebook.

Static checks: valid nbformat-4 JSON, no stored outputs, a markdown cell first and the
guarded Colab install cell next, and imports limited to diffjax plus the standard library
and the usual scientific packages (a notebook must work from an installed diffjax alone).
The repository URL the Colab cell clones is ``setup.cfg``'s ``url`` (its one documented
place), with no placeholder left in the notebooks or ``colab/README.md``.
"""
from __future__ import annotations

import ast
import json
import os
import pathlib
import re
import subprocess
import sys
import time

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
COLAB = REPO_ROOT / "colab"
NOTEBOOKS = sorted(COLAB.glob("*.ipynb"))
TIMEOUT_S = 240  # per notebook; each takes well under 60 s on an idle 2-core machine

# Top-level modules a notebook may import besides the standard library.
ALLOWED_IMPORTS = {"diffjax", "jax", "jaxlib", "flax", "optax", "orbax", "chex", "numpy",
                   "scipy", "matplotlib", "skimage", "PIL", "google", "IPython"}

# Exec the cells of a notebook in one namespace; summarise the namespace as JSON.
_RUNNER = r'''
import json, re, sys, time, traceback
nb_path, summary_path = sys.argv[1], sys.argv[2]
nb = json.load(open(nb_path, encoding="utf-8"))
magic = re.compile(r"^(\s*)[!%].*$", re.M)
ns = {"__name__": "__main__"}
timings = []
for index, cell in enumerate(nb["cells"]):
    if cell["cell_type"] != "code":
        continue
    source = magic.sub(r"\1pass", "".join(cell["source"]))
    t0 = time.perf_counter()
    try:
        exec(compile(source, f"{nb_path} [cell {index}]", "exec"), ns)
    except BaseException:
        traceback.print_exc()
        print(f"NOTEBOOK FAILED in cell {index}", file=sys.stderr)
        sys.exit(1)
    timings.append([index, round(time.perf_counter() - t0, 2)])

def plain(value, depth=0):
    """JSON-able copy of nested plain data, or raise TypeError."""
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if depth < 3 and isinstance(value, (list, tuple)):
        return [plain(v, depth + 1) for v in value]
    if depth < 3 and isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: plain(v, depth + 1) for k, v in value.items()}
    raise TypeError(type(value).__name__)

def describe(value):
    if isinstance(value, BaseException):
        return {"exception": [c.__name__ for c in type(value).__mro__], "message": str(value)}
    shape = getattr(value, "shape", None)
    if isinstance(shape, tuple) and hasattr(value, "dtype"):
        return {"shape": list(shape), "dtype": str(value.dtype)}
    if type(value).__name__.endswith("Path"):
        return {"path": str(value)}
    try:
        return plain(value)
    except TypeError:
        return None

summary = {k: describe(v) for k, v in ns.items() if not k.startswith("_")}
summary["__timings__"] = timings
json.dump({k: v for k, v in summary.items() if v is not None}, open(summary_path, "w"))
'''


def _load(path: pathlib.Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _code_cells(nb: dict) -> list[str]:
    return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]


def _imported_modules(source: str) -> set[str]:
    import re

    tree = ast.parse(re.sub(r"^(\s*)[!%].*$", r"\1pass", source, flags=re.M))
    mods = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            mods.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                mods.add("." * node.level)
            else:
                mods.add(node.module.split(".")[0])
    return mods


def _ids(paths):
    return [p.stem for p in paths]


def test_notebooks_exist():
    names = [p.name for p in NOTEBOOKS]
    assert names == ["01_convert_and_run_sd_backbone.ipynb",
                     "02_entropy_coding_and_bitstreams.ipynb",
                     "03_rate_distortion_eval.ipynb"]
    assert (COLAB / "README.md").is_file()
    readme = (COLAB / "README.md").read_text()
    assert all(n in readme for n in names)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_structure(path):
    nb = _load(path)
    assert nb["nbformat"] == 4 and nb["nbformat_minor"] >= 4
    assert nb["metadata"]["kernelspec"]["language"] == "python"
    cells = nb["cells"]
    for cell in cells:
        assert cell["cell_type"] in ("markdown", "code")
        assert isinstance(cell["source"], list) and isinstance(cell["metadata"], dict)
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [], f"{path.name}: a code cell has stored outputs"
            assert cell["execution_count"] is None, f"{path.name}: stored execution count"
    if nb["nbformat_minor"] >= 5:
        ids = [c["id"] for c in cells]
        assert len(set(ids)) == len(ids)
    # A markdown introduction, then the Colab install cell, guarded so it is a no-op elsewhere.
    assert cells[0]["cell_type"] == "markdown" and "".join(cells[0]["source"]).startswith("# ")
    setup = "".join(cells[1]["source"])
    assert cells[1]["cell_type"] == "code"
    assert 'IN_COLAB = "google.colab" in sys.modules' in setup and "if IN_COLAB:" in setup
    assert "install" in setup
    # Imports: diffjax + stdlib + standard scientific packages; no project internals.
    for source in _code_cells(nb):
        for mod in _imported_modules(source):
            assert mod in ALLOWED_IMPORTS or mod in sys.stdlib_module_names, (
                f"{path.name} imports {mod!r}: notebooks may only use diffjax and standard "
                "scientific packages")


def _repo_url() -> str:
    """``url`` of ``setup.cfg``'s ``[metadata]``: the repository's one documented URL."""
    import configparser

    cfg = configparser.ConfigParser(interpolation=None)
    cfg.read(REPO_ROOT / "setup.cfg", encoding="utf-8")
    url = cfg.get("metadata", "url", fallback="").strip()
    assert re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", url), (
        f"setup.cfg [metadata] url must be the repository's GitHub URL, got {url!r}")
    return url


PLACEHOLDERS = re.compile(r"YOUR[-_]|<org>|<repo>|example\.(com|org)|github\.com/(org|user)/",
                          re.I)
GIT_URL = re.compile(r"https?://[^\s\"'()<>`]*\.git\b|https?://github\.com/[^\s\"'()<>`]+")


def test_repo_url_has_one_source():
    """Every notebook's Colab cell clones exactly setup.cfg's ``url``; no other repository
    URL and no placeholder appear in the notebooks or the Colab README."""
    url = _repo_url()
    for path in NOTEBOOKS:
        raw = path.read_text(encoding="utf-8")
        assert not PLACEHOLDERS.search(raw), (f"{path.name}: placeholder "
                                              f"{PLACEHOLDERS.search(raw).group(0)!r}")
        setup = "".join(_load(path)["cells"][1]["source"])
        m = re.search(r'^DIFFJAX_REPO = os\.environ\.get\("DIFFJAX_REPO", "([^"]+)"\)$',
                      setup, re.M)
        assert m, f"{path.name}: the Colab cell sets no DIFFJAX_REPO default"
        assert m.group(1) in (url, url + ".git"), (
            f"{path.name}: the Colab cell clones {m.group(1)!r}; setup.cfg's url is {url!r} "
            f"(set the DIFFJAX_REPO default of cell 1 to {url + '.git'!r})")
        assert '"git", "clone"' in setup and "DIFFJAX_REPO" in setup.split('"git", "clone"')[1]
        others = {u.removesuffix(".git") for u in GIT_URL.findall(raw)} - {url}
        assert not others, f"{path.name}: other repository URLs {sorted(others)}"
    readme = (COLAB / "README.md").read_text(encoding="utf-8")
    assert not PLACEHOLDERS.search(readme), PLACEHOLDERS.search(readme).group(0)
    owner_repo = url.removeprefix("https://github.com/")
    links = re.findall(r"colab\.research\.google\.com/github/([\w.-]+/[\w.-]+)/", readme)
    assert links and set(links) == {owner_repo}, links
    assert url in readme and "setup.cfg" in readme


def _execute(path: pathlib.Path, tmp_path: pathlib.Path) -> dict:
    env = dict(os.environ)
    # Run as a user would: the real device count (the suite's conftest fakes 8 CPU devices).
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if "xla_force_host_platform_device_count" not in f]
    env["XLA_FLAGS"] = " ".join(flags)
    env.setdefault("JAX_PLATFORMS", "cpu")
    env["MPLBACKEND"] = "Agg"
    env["DIFFJAX_NOTEBOOK_OUT"] = str(tmp_path / "out")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    summary = tmp_path / "summary.json"
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-c", _RUNNER, str(path), str(summary)],
                              cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                              timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"{path.name} did not finish within {TIMEOUT_S} s:\n"
                    f"{(err.stdout or '')[-3000:]}\n{(err.stderr or '')[-3000:]}")
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, (f"{path.name} failed:\n{proc.stdout[-3000:]}\n"
                                  f"{proc.stderr[-6000:]}")
    result = json.loads(summary.read_text())
    result["__stdout__"] = proc.stdout
    print(f"{path.name}: {wall:.1f} s; per cell {result['__timings__']}")
    return result


def _out_files(tmp_path: pathlib.Path, suffix: str) -> list[pathlib.Path]:
    return sorted((tmp_path / "out").glob(f"*{suffix}"))


def _notebook(name: str) -> pathlib.Path:
    path = COLAB / name
    assert path.is_file(), f"{path} is missing"
    return path


def test_01_convert_and_run_sd_backbone(tmp_path):
    ns = _execute(_notebook("01_convert_and_run_sd_backbone.ipynb"), tmp_path)
    assert ns["converted_components"] == ["unet", "vae"]
    assert ns["latents"]["shape"] == [1, 16, 16, 4]
    assert ns["reconstruction"]["shape"] == [1, 32, 32, 3]
    assert ns["unet_out"]["shape"] == [1, 16, 16, 4]
    assert ns["sampled_latents"]["shape"] == [1, 16, 16, 4]
    assert ns["partial_latents"]["shape"] == [1, 16, 16, 4]
    assert ns["sampled_image"]["shape"] == [1, 32, 32, 3]
    assert ns["NUM_STEPS"] >= 2
    assert [p.name for p in _out_files(tmp_path, ".png")] == ["01_sd_backbone.png"]
    assert "all checks passed" in ns["__stdout__"]


def test_02_entropy_coding_and_bitstreams(tmp_path):
    ns = _execute(_notebook("02_entropy_coding_and_bitstreams.ipynb"), tmp_path)
    h, w = ns["image"]["shape"][:2]
    assert ns["decoded"] == {"shape": [h, w, 3], "dtype": "uint8"}
    assert ns["num_bytes"] > 0 and ns["header"]["codec"] == "hyperprior"
    assert ns["header"]["height"] == h and ns["header"]["width"] == w
    assert ns["header"]["file_bytes"] == ns["num_bytes"]
    # The corrupted byte was caught as a diffjax.BitstreamError subclass.
    caught = ns["corrupt_error"]["exception"]
    assert "BitstreamError" in caught and caught[0] != "BitstreamError"
    errors = ns["damage_errors"]
    assert errors["one flipped payload bit"] == "CorruptError"
    assert errors["truncated"] == "TruncatedError"
    assert errors["other model parameters"] == "WrongModelError"
    assert _out_files(tmp_path, ".png")
    assert "all checks passed" in ns["__stdout__"]


def test_03_rate_distortion_eval(tmp_path):
    ns = _execute(_notebook("03_rate_distortion_eval.ipynb"), tmp_path)
    assert ns["images"]["shape"][0] == 2
    for key in ("bd_rate_psnr", "bd_rate_ms_ssim"):
        assert isinstance(ns[key], float) and -100.0 < ns[key] < 1000.0
    assert set(ns["curve_names"]) == {"JPEG", "WebP"}
    plots = _out_files(tmp_path, ".png")
    assert [p.name for p in plots] == ["03_rd_curves.png"]
    assert plots[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "all checks passed" in ns["__stdout__"]
