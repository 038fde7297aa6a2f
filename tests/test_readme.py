"""The README's quick start runs as written (after the main job's `diffjax convert`)."""
import pathlib
import re
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_readme_quick_start_runs(tmp_path):
    readme = (REPO / "README.md").read_text()
    setup = re.search(r"## Set-up \(two commands\)\n\n```bash\n(.*?)```", readme, re.S).group(1)
    assert "./install.sh && diffjax demo" in setup and "./install.sh --test && python -m pytest -q" in setup
    commands = re.search(r"## Quick start\n\n```bash\n(.*?)```", readme, re.S).group(1)
    main_job = re.search(r"^(diffjax convert \S+ (\S+))", commands, re.M)
    assert main_job, "the quick start converts the committed sample with `diffjax convert SRC DST`"
    out = tmp_path / "sample"
    convert = subprocess.run([sys.executable, "-m", "diffjax", "convert",
                              main_job.group(1).split()[2], str(out)],
                             cwd=REPO, capture_output=True, text=True, timeout=300)
    assert convert.returncode == 0, convert.stderr[-2000:]
    code = re.search(r"## Quick start\n.*?```python\n(.*?)```", readme, re.S).group(1)
    code = code.replace(main_job.group(2), str(out))
    code += "\nassert latent.shape == x.shape and decoded.shape == image.shape\nprint('OK')\n"
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("OK"), run.stderr[-3000:]
