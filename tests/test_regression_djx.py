"""Files written by the release before the codec-kit refactor still decode to the same pixels.

``tests/data/regression/`` holds small images, the ``.djx`` files that ``diffjax compress``
of commit b9f4498 wrote for them with the shipped residual model, their decodes (the stored
steps and ``--steps 0``) and ``diffjax info --json`` of each (``make.py`` made them). Today's
CLI must decode them to identical pixels, print the same header fields and, given the same
image and settings, write the same bytes.
"""
import json
import pathlib

import numpy as np
import pytest
from PIL import Image

from diffjax import cli

DATA = pathlib.Path(__file__).parent / "data" / "regression"
CASES = sorted(p.stem for p in DATA.glob("*.djx"))
SETTINGS = {"rgb_q3": (3, 4), "rgb_odd_q1": (1, 2), "gray_q5": (5, 0), "rgba_q2": (2, 4)}


def _pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


def test_regression_files_are_present():
    assert set(CASES) == set(SETTINGS)


@pytest.mark.parametrize("name", CASES)
def test_old_file_decodes_to_the_same_pixels(name, tmp_path, capsys):
    djx = DATA / f"{name}.djx"
    for suffix, extra in (("decoded", []), ("base", ["--steps", "0"])):
        out = tmp_path / f"{name}.{suffix}.png"
        assert cli.main(["decompress", str(djx), "-o", str(out), *extra]) == 0
        np.testing.assert_array_equal(_pixels(out), _pixels(DATA / f"{name}.{suffix}.png"))
    capsys.readouterr()
    assert cli.main(["info", "--json", str(djx)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info == json.loads((DATA / f"{name}.info.json").read_text())


@pytest.mark.parametrize("name", CASES)
def test_same_image_and_settings_give_the_same_bytes(name, tmp_path):
    quality, steps = SETTINGS[name]
    out = tmp_path / f"{name}.djx"
    assert cli.main(["compress", str(DATA / f"{name}.png"), "-o", str(out),
                     "--quality", str(quality), "--steps", str(steps)]) == 0
    assert out.read_bytes() == (DATA / f"{name}.djx").read_bytes()
