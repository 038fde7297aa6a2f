"""The README's quick start runs as written: its shell commands with the shipped weights on a
real photo, then its Python block on the model the shell block converted.

The commands are parsed from README.md itself (the ```bash block under "## Quick start"),
so a command the README shows that does not work fails here. Each ``diffjax ...`` line runs
in a fresh process (``python -m diffjax``, the ``diffjax`` console script's entry point) in a
temporary folder that holds ``photo.png`` (a Kodak crop), so relative names run unchanged;
only paths that would leave that folder are substituted: a repository path (the committed
sample, ``data/...``) becomes absolute, an absolute output path (``/tmp/...``) moves into
the temporary folder.
"""
import os
import pathlib
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

REPO = pathlib.Path(__file__).resolve().parents[1]
SUBCOMMANDS = ("compress", "decompress", "info", "convert")


def _readme() -> str:
    return (REPO / "README.md").read_text()


def _quick_start_commands() -> list[list[str]]:
    """The ``diffjax`` commands of the README's quick-start shell block (comments dropped)."""
    block = re.search(r"## Quick start\n\n```bash\n(.*?)```", _readme(), re.S)
    assert block, "README.md has no ```bash block right under '## Quick start'"
    commands = []
    for line in block.group(1).splitlines():
        argv = shlex.split(line, comments=True)
        if argv:
            assert argv[0] == "diffjax", f"quick start line is not a diffjax command: {line!r}"
            commands.append(argv)
    return commands


def _is_path(token: str) -> bool:
    return "/" in token or bool(re.search(r"\.[A-Za-z]\w*$", token))


def _localise(argv: list[str], tmp: pathlib.Path) -> list[str]:
    """``argv`` with only its paths substituted (see the module docstring)."""
    out = []
    for token in argv[1:]:
        if token.startswith("-") or not _is_path(token):
            out.append(token)
        elif pathlib.Path(token).is_absolute():
            out.append(str(tmp / pathlib.Path(token).name))
        elif (REPO / token).exists():
            out.append(str(REPO / token))
        else:
            out.append(token)  # a name in the working folder (photo.png, photo.djx, ...)
    return out


def _env() -> dict:
    env = dict(os.environ)  # DIFFJAX_COMPILATION_CACHE=0 from conftest: no user cache written
    # the real device count, as a user has (conftest fakes 8 CPU devices)
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if "xla_force_host_platform_device_count" not in f)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def _run(argv: list[str], cwd: pathlib.Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "diffjax", *argv], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (f"README quick start: `diffjax {shlex.join(argv)}` exited "
                                  f"{proc.returncode}\n{proc.stdout[-2000:]}\n"
                                  f"{proc.stderr[-3000:]}")
    return proc


def test_quick_start_shows_the_main_commands():
    setup = re.search(r"## Set-up \(two commands\)\n\n```bash\n(.*?)```", _readme(), re.S).group(1)
    assert "./install.sh && diffjax demo" in setup
    assert "./install.sh --test && python -m pytest -q" in setup
    shown = [argv[1] for argv in _quick_start_commands()]
    assert sorted(set(shown)) == sorted(SUBCOMMANDS), shown
    assert shown.index("compress") < min(shown.index("decompress"), shown.index("info")), \
        "the quick start must compress before it decompresses / inspects the file"


@pytest.fixture(scope="module")
def quick_start(tmp_path_factory, shared_data):
    """Runs every quick-start shell command in order; ``(folder, photo name, {subcommand:
    (argv as run, completed process)})``."""
    tmp = tmp_path_factory.mktemp("quick_start")
    commands = _quick_start_commands()
    inputs = [argv[2] for argv in commands if argv[1] == "compress"]
    assert inputs, "the quick start compresses no image"
    photo = inputs[0]
    assert not pathlib.Path(photo).is_absolute() and "/" not in photo, photo
    kodim = Image.open(shared_data / "kodak" / "kodim23.png").convert("RGB")
    kodim.crop((200, 100, 392, 228)).save(tmp / photo)  # a 192x128 crop of a real photo
    ran = {}
    for argv in commands:
        local = _localise(argv, tmp)
        ran.setdefault(argv[1], []).append((local, _run(local, tmp)))
    return tmp, photo, ran


def _option(argv: list[str], *names: str) -> str | None:
    for i, token in enumerate(argv[:-1]):
        if token in names:
            return argv[i + 1]
    return None


def test_quick_start_compress_decompress_info(quick_start):
    from diffjax.codecs import pretrained

    tmp, photo, ran = quick_start
    original = np.asarray(Image.open(tmp / photo))
    compressed = {}
    for argv, proc in ran["compress"]:
        out = _option(argv, "-o", "--output") or str(pathlib.Path(argv[1]).with_suffix(".djx"))
        data = (tmp / out).read_bytes()
        assert len(data) > 0 and f"{len(data)} bytes" in proc.stdout, proc.stdout
        compressed[pathlib.Path(out).name] = (data, _option(argv, "-q", "--quality"))
    for argv, proc in ran["decompress"]:
        src = pathlib.Path(argv[1]).name
        assert src in compressed, f"decompress reads {src}, which the quick start did not write"
        out = tmp / _option(argv, "-o", "--output")
        decoded = np.asarray(Image.open(out))
        assert decoded.shape == original.shape and decoded.dtype == np.uint8
        # a real reconstruction of the photo, not a blank or foreign image
        mse = np.mean((decoded.astype(float) - original.astype(float)) ** 2)
        assert 10 * np.log10(255 ** 2 / mse) > 20, mse
    for argv, proc in ran["info"]:
        name = pathlib.Path(argv[1]).name
        assert name in compressed, f"info reads {name}, which the quick start did not write"
        data, quality = compressed[name]
        fields = dict(re.findall(r"^(\w[\w ]*):\s+(.*)$", proc.stdout, re.M))
        assert fields["codec"].split()[0] == pretrained.DEFAULT_CODEC, proc.stdout
        assert fields["geometry"].startswith(f"{original.shape[1]}x{original.shape[0]} px")
        assert f"{len(data)} bytes" in fields["size"]
        if quality is not None:
            assert fields["quality"] == quality


def test_quick_start_convert_then_python_block(quick_start):
    """``diffjax convert`` wrote the sample model, and the README's Python block runs on it."""
    tmp, _, ran = quick_start
    ((argv, _),) = ran["convert"]
    readme_argv = next(a for a in _quick_start_commands() if a[1] == "convert")
    out = pathlib.Path(argv[2])
    assert out.parent == tmp and {"unet", "vae"} <= {p.name for p in out.iterdir()}
    code = re.search(r"## Quick start\n.*?```python\n(.*?)```", _readme(), re.S).group(1)
    assert readme_argv[3] in code, "the Python block loads what the quick start converted"
    code = code.replace(readme_argv[3], str(out))
    code += "\nassert latent.shape == x.shape and decoded.shape == image.shape\nprint('OK')\n"
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("OK"), run.stderr[-3000:]
