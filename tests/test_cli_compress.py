"""``diffjax compress`` / ``decompress`` / ``demo`` with a tiny random model (``--model``).

The model is saved both as a model folder and as an Orbax training workdir, the two forms
``--model`` accepts; the shipped weights are tested in
``tests/codecs/test_residual_weights.py``.
"""
import json
import pathlib

import numpy as np
import pytest
from PIL import Image

import jax

from diffjax import cli
from diffjax.codecs import pretrained

CFG = dict(N=8, M=12, num_qualities=2, refiner_channels=[8, 16], refiner_layers=1,
           refiner_groups=4, patch=4, residual_scale=5.0)


def _photo(h, w, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    x = 127 + 70 * np.stack([np.sin(xx / 9), np.cos(yy / 6), np.sin((xx - yy) / 13)], -1)
    return np.clip(x + rng.normal(0, 5, x.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def model_dir():
    """A model folder with tiny random-init weights (see tests/codecs/test_residual.py)."""
    return pathlib.Path(__file__).parent / "codecs" / "data" / "residual_tiny"


def _run(capsys, *argv):
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_help_states_quality_range_and_default(capsys):
    with pytest.raises(SystemExit):
        cli.main(["compress", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "from 1 (smallest file) to" in out and "default: the middle one" in out
    assert "--steps" in out and "--model" in out


def test_round_trip_rgb_gray_rgba(model_dir, tmp_path, capsys):
    rgb = _photo(50, 75)
    cases = {"rgb.png": (rgb, "RGB"), "gray.png": (rgb[..., 1], "L"),
             "rgba.png": (np.dstack([rgb, (np.arange(50 * 75) % 256).astype(np.uint8)
                                     .reshape(50, 75)]), "RGBA"),
             "photo.jpg": (rgb, "RGB")}
    for name, (arr, mode) in cases.items():
        src = tmp_path / name
        Image.fromarray(arr, mode).save(src)
        djx, png = tmp_path / (name + ".djx"), tmp_path / (name + ".out.png")
        rc, out, err = _run(capsys, "compress", src, "-o", djx, "--model", model_dir,
                            "--quality", 2, "--steps", 1)
        assert rc == 0, err
        assert "bpp" in out and djx.stat().st_size > 0
        rc, out, err = _run(capsys, "decompress", djx, "-o", png, "--model", model_dir)
        assert rc == 0, err
        with Image.open(png) as im:
            assert im.mode == mode and im.size == (75, 50)
            dec = np.asarray(im)
        if mode == "RGBA":
            np.testing.assert_array_equal(dec[..., 3], arr[..., 3])  # alpha is lossless
    # --steps 0 at decode gives the base reconstruction, which differs from the refined one
    rc, _, err = _run(capsys, "decompress", tmp_path / "rgb.png.djx", "-o", tmp_path / "b.png",
                      "--model", model_dir, "--steps", 0)
    assert rc == 0, err
    a = np.asarray(Image.open(tmp_path / "b.png"))
    b = np.asarray(Image.open(tmp_path / "rgb.png.out.png"))
    assert a.shape == b.shape and not np.array_equal(a, b)


def test_errors_are_one_line(model_dir, tmp_path, capsys):
    (tmp_path / "notimage.png").write_bytes(b"this is not a png")
    Image.fromarray(np.zeros((8, 8), np.float32)).save(tmp_path / "float.tif")
    (tmp_path / "no_frames").mkdir()
    Image.fromarray(_photo(20, 20)).save(tmp_path / "ok.png")
    (tmp_path / "bad.djx").write_bytes(b"DJXB\x01garbage")
    cases = [
        (["compress", tmp_path / "missing.png", "--model", model_dir], "no such file"),
        (["compress", tmp_path / "notimage.png", "--model", model_dir], "cannot read"),
        (["compress", tmp_path / "float.tif", "--model", model_dir], "not supported"),
        (["compress", tmp_path / "no_frames", "--model", model_dir], "no_frames"),
        (["compress", tmp_path / "ok.png", "--model", model_dir, "--frames", 2], "video"),
        (["compress", tmp_path / "ok.png", "--codec", "nonesuch"], "unknown codec"),
        (["compress", tmp_path / "ok.png", "--codec", "intra", "--model", model_dir],
         "intra codec codes video"),
        (["decompress", tmp_path, "--model", model_dir], "directory"),
        (["compress", tmp_path / "ok.png", "--model", model_dir, "-q", 3], "quality"),
        (["compress", tmp_path / "ok.png", "--model", tmp_path / "nomodel"], "does not exist"),
        (["decompress", tmp_path / "bad.djx", "--model", model_dir], "truncated"),
        (["decompress", tmp_path / "missing.djx", "--model", model_dir], "cannot read"),
    ]
    for argv, needle in cases:
        rc, out, err = _run(capsys, *argv)
        assert rc == 2, (argv, out, err)
        assert err.count("\n") == 1 and "Traceback" not in err and needle in err, err


def test_no_shipped_weights_is_a_clear_error(tmp_path, capsys, monkeypatch):
    (tmp_path / "empty").mkdir()
    monkeypatch.setattr(pretrained, "WEIGHTS_DIR", tmp_path / "empty")
    Image.fromarray(_photo(20, 20)).save(tmp_path / "ok.png")
    rc, _, err = _run(capsys, "compress", tmp_path / "ok.png")
    assert rc == 2 and "no trained residual weights" in err and "--model" in err
    rc, _, err = _run(capsys, "compress", tmp_path / "ok.png", "--codec", "hyperprior")
    assert rc == 2 and "no trained hyperprior weights" in err and "--model" in err


def test_output_folder_and_wrong_model(model_dir, tmp_path, capsys):
    """``-o EXISTING_DIR`` writes INPUT.djx inside it and leaves no temporary file; a file
    decoded with another model names the codec and model that wrote it and --model."""
    Image.fromarray(_photo(30, 40)).save(tmp_path / "ok.png")
    (tmp_path / "out").mkdir()
    rc, out, err = _run(capsys, "compress", tmp_path / "ok.png", "-o", tmp_path / "out",
                        "--model", model_dir, "--steps", 0)
    assert rc == 0, err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["ok.djx"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.png", "out"]
    rc, _, err = _run(capsys, "decompress", tmp_path / "out" / "ok.djx")  # shipped model
    assert rc == 2 and "written by residual" in err and "--model" in err, err
    assert "quality 1" in err and "Traceback" not in err


def test_limit_zero_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", "--limit", "0"])
    assert exc.value.code == 2 and "expected 1 or more" in capsys.readouterr().err


def test_model_from_training_workdir(model_dir, tmp_path, capsys):
    """--model accepts an experiments/train.py workdir (Orbax checkpoint + config.json)."""
    from diffjax.train.checkpoint import Checkpointer

    loaded = pretrained.load_model(model_dir)
    work = tmp_path / "run"
    cfg = {"task": {"name": "residual", "kwargs": {**{k: v for k, v in CFG.items()
                                                      if k != "num_qualities"},
                                                   "lmbdas": [0.002, 0.02]}}}
    (work).mkdir()
    (work / "config.json").write_text(json.dumps(cfg))
    ck = Checkpointer(work / "checkpoints", save_every=1, async_save=False)
    ck.save(7, {"params": jax.tree.map(np.asarray, loaded.params), "step": np.int32(7)}, cfg)
    ck.close()
    again = pretrained.load_model(work)
    without_steps = lambda config: {k: v for k, v in config.items() if k != "steps"}  # noqa: E731
    assert without_steps(again.config) == without_steps(loaded.config)
    assert again.info["step"] == 7 and again.codec_name == "residual"
    jax.tree.map(np.testing.assert_array_equal, again.params, loaded.params)
    exported = pretrained.export_model(work, tmp_path / "exported")
    assert exported.config == again.config and exported.info["lmbdas"] == [0.002, 0.02]
    Image.fromarray(_photo(30, 30)).save(tmp_path / "ok.png")
    rc, out, err = _run(capsys, "compress", tmp_path / "ok.png", "-o", tmp_path / "ok.djx",
                        "--model", work, "--steps", 0)
    assert rc == 0, err
    assert "quality 1," in out  # no --quality: the middle rate point (1 of 2)


def test_demo_prints_table_and_saves_png(model_dir, tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(_photo(64, 96, 1)).save(folder / "a.png")
    Image.fromarray(_photo(40, 40, 2)).save(folder / "b.jpg")
    out_png = tmp_path / "demo.png"
    rc, out, err = _run(capsys, "demo", "--images", folder, "--model", model_dir,
                        "--steps", 1, "-o", out_png)
    assert rc == 0, err
    for word in ("bpp", "PSNR", "MS-SSIM", "LPIPS", "enc s", "dec s", "a.png", "b.jpg",
                 "base", "refined"):
        assert word in out
    lines = [ln for ln in out.splitlines() if ln.startswith(("a.png", "b.jpg"))]
    assert len(lines) == 4  # two decoders per image
    psnrs = [float(ln.split()[4 if "base" in ln else 6]) for ln in lines]
    assert all(5 < p < 60 for p in psnrs)
    with Image.open(out_png) as im:
        assert im.size[1] == 2 * (256 + 4)


def test_help_does_not_import_jax():
    """``diffjax --help`` and the commands' parsers stay instant: no jax import."""
    import subprocess
    import sys

    code = ("import sys; from diffjax import cli; cli.build_parser().format_help(); "
            "print('jax' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "False"


def test_steps_limits_agree_with_the_codec():
    from diffjax.codecs.residual import DEFAULT_STEPS, MAX_STEPS
    from diffjax.commands import compress, demo

    import argparse

    parser = argparse.ArgumentParser()
    compress.add_arguments(parser)
    assert f"0 to {MAX_STEPS} " in " ".join(parser.format_help().split())
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    assert parser.get_default("steps") == DEFAULT_STEPS
