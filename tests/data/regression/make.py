"""Make the pre-refactor regression data: small images, their .djx files written by the
`diffjax compress` CLI of commit b9f4498 (before the codec-kit refactor, issue 21), their
decodes (stored steps and base only) and `diffjax info --json` of each file.

Run once from the repository root (needs ../shared/data/kodak); the outputs are committed
and tests/test_regression_djx.py checks that today's diffjax decodes them to the same pixels.

    python tests/data/regression/make.py
"""
import json
import pathlib
import subprocess
import sys

import numpy as np
from PIL import Image

HERE = pathlib.Path(__file__).resolve().parent
KODAK = HERE.parents[2].parent / "shared" / "data" / "kodak"

# name: (kodak image, crop box (left, upper, right, lower), mode, quality, steps)
CASES = {
    "rgb_q3": ("kodim23.png", (300, 100, 428, 196), "RGB", 3, 4),
    "rgb_odd_q1": ("kodim05.png", (200, 200, 277, 253), "RGB", 1, 2),
    "gray_q5": ("kodim08.png", (100, 50, 164, 130), "L", 5, 0),
    "rgba_q2": ("kodim15.png", (250, 120, 320, 184), "RGBA", 2, 4),
}


def cli(*args):
    return subprocess.run([sys.executable, "-m", "diffjax", *args], check=True,
                          capture_output=True, text=True).stdout


def main():
    for name, (src, box, mode, quality, steps) in CASES.items():
        im = Image.open(KODAK / src).convert("RGB").crop(box)
        if mode == "L":
            im = im.convert("L")
        elif mode == "RGBA":
            w, h = im.size
            alpha = np.tile(np.linspace(0, 255, w, dtype=np.float32), (h, 1))
            alpha[h // 3: h // 2] = 255
            im.putalpha(Image.fromarray(alpha.round().astype(np.uint8), "L"))
        im.save(HERE / f"{name}.png")
        djx = HERE / f"{name}.djx"
        cli("compress", str(HERE / f"{name}.png"), "-o", str(djx), "--quality", str(quality),
            "--steps", str(steps))
        cli("decompress", str(djx), "-o", str(HERE / f"{name}.decoded.png"))
        cli("decompress", str(djx), "-o", str(HERE / f"{name}.base.png"), "--steps", "0")
        (HERE / f"{name}.info.json").write_text(
            json.dumps(json.loads(cli("info", "--json", str(djx))), indent=1) + "\n")


if __name__ == "__main__":
    main()
