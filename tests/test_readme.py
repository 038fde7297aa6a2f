"""The README's quick start runs as written (after the main job's `diffjax convert`)."""
import pathlib
import re
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_readme_quick_start_runs(tmp_path):
    readme = (REPO / "README.md").read_text()
    setup = re.search(r"## Set-up \(two commands\)\n\n```bash\n(.*?)```", readme, re.S).group(1)
    main_job = re.search(r"\./install\.sh && (diffjax convert \S+ (\S+))", setup)
    assert main_job, "the README's first set-up command must run `diffjax convert SRC DST`"
    out = tmp_path / "sample"
    convert = subprocess.run([sys.executable, "-m", "diffjax", "convert",
                              main_job.group(1).split()[2], str(out)],
                             cwd=REPO, capture_output=True, text=True, timeout=300)
    assert convert.returncode == 0, convert.stderr[-2000:]
    code = re.search(r"## Quick start\n\n```python\n(.*?)```", readme, re.S).group(1)
    code = code.replace(main_job.group(2), str(out))
    code += "\nassert latent.shape == x.shape and decoded.shape == image.shape\nprint('OK')\n"
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("OK"), run.stderr[-3000:]
