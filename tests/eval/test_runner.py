"""The RD runner end to end on two small images with a real diffjax codec (the
hyperprior codec, restored from a training-layout Orbax checkpoint) and a baseline."""
import json
import pathlib

import jax
import numpy as np
import pytest
import pytorch_msssim
import torch
from PIL import Image

from diffjax import BitstreamError, codecs
from diffjax.cli import main
from diffjax.eval.plots import load_reference, plot_rd
from diffjax.eval.points import baseline_points, checkpoint_point, codec_point
from diffjax.eval.runner import _slug, evaluate_rd, load_images
from diffjax.train.checkpoint import Checkpointer

SIDE = 176  # > 160 so MS-SSIM is defined; not a multiple of the codec's stride 64
CONFIG = {"task": {"name": "rate_distortion",
                   "kwargs": {"N": 8, "M": 12, "mean_scale": True, "lmbda": 0.0067}}}
REPO = pathlib.Path(__file__).resolve().parents[2]
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


@pytest.fixture(scope="module")
def images_dir(tmp_path_factory, shared_data):
    d = tmp_path_factory.mktemp("images")
    for name, (top, left) in (("kodim01.png", (100, 200)), ("kodim23.png", (150, 300))):
        im = np.asarray(Image.open(shared_data / "kodak" / name).convert("RGB"))
        Image.fromarray(im[top:top + SIDE, left:left + SIDE]).save(d / name)
    return d


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A hyperprior codec's params saved the way ``diffjax.train`` saves them."""
    codec = codecs.get("hyperprior", N=8, M=12, mean_scale=True)
    # one-off parameter generation: compiled once, with XLA's cheap optimisation level
    # (2 s instead of 23 s of CPU; init values are random bits + fixed constants anyway)
    key = jax.random.key(0)
    params = jax.jit(codec.init).lower(key).compile(compiler_options=FAST_COMPILE)(key)
    workdir = tmp_path_factory.mktemp("run")
    ck = Checkpointer(workdir / "checkpoints", save_every=1, keep=None, async_save=False)
    ck.save(3, {"step": np.int32(3), "params": params}, CONFIG, force=True)
    ck.close()
    return workdir, codec, params


@pytest.fixture(scope="module")
def run(images_dir, checkpoint, tmp_path_factory):
    workdir, _, _ = checkpoint
    points = [checkpoint_point(workdir)] + baseline_points("jpeg", [60, 20])
    streams = tmp_path_factory.mktemp("streams")
    result = evaluate_rd(points, load_images(images_dir), bitstream_dir=streams,
                         anchor="JPEG", progress=False, dataset="two")
    return result, streams


def _msssim_ref(x, y):
    t = lambda a: torch.from_numpy(a).permute(2, 0, 1)[None].double()  # noqa: E731
    return float(pytorch_msssim.ms_ssim(t(x), t(y), data_range=255))


def test_records_come_from_the_stored_bitstreams(run, images_dir, checkpoint):
    result, streams = run
    _, codec, params = checkpoint
    assert set(result["curves"]) == {"diffjax hyperprior", "JPEG"}
    (hp,) = result["curves"]["diffjax hyperprior"]
    assert hp["setting"]["step"] == 3 and hp["setting"]["codec_kwargs"]["M"] == 12
    decoders = {"diffjax hyperprior": lambda b: codec.decode(params, b),
                "JPEG": lambda b: np.asarray(Image.open(__import__("io").BytesIO(b)))}
    for curve, pts in result["curves"].items():
        for p in pts:
            for rec in p["per_image"]:
                ref = np.asarray(Image.open(images_dir / rec["image"]).convert("RGB"))
                f = streams / _slug(curve) / _slug(p["label"]) / rec["image"].replace(".png",
                                                                                      ".bin")
                data = f.read_bytes()
                assert len(data) == rec["bytes"]
                assert rec["bpp"] == pytest.approx(8 * len(data) / SIDE ** 2, rel=1e-12)
                dec = decoders[curve](data)  # independent decode of the file on disk
                mse = np.mean((ref.astype(float) - dec) ** 2)
                assert rec["psnr"] == pytest.approx(10 * np.log10(255 ** 2 / mse), abs=1e-4)
                assert rec["ms_ssim"] == pytest.approx(_msssim_ref(ref, dec), abs=1e-4)
                assert 0 <= rec["lpips"] < 1.5 and rec["enc_s"] > 0 and rec["dec_s"] > 0
            for key in ("bpp", "psnr", "ms_ssim", "lpips", "enc_s", "dec_s"):
                assert p[key] == pytest.approx(np.mean([r[key] for r in p["per_image"]]))
            assert p["ms_ssim_db"] == pytest.approx(-10 * np.log10(1 - p["ms_ssim"]))


def test_aggregation_order_bd_table_json_and_plots(run, tmp_path):
    result, _ = run
    q20, q60 = result["curves"]["JPEG"]  # sorted by rate
    assert (q20["label"], q60["label"]) == ("quality=20", "quality=60")
    assert q60["bpp"] > q20["bpp"] and q60["psnr"] > q20["psnr"] and q60["lpips"] < q20["lpips"]
    assert result["bd_rate"]["anchor"] == "JPEG"
    assert "diffjax hyperprior" in result["bd_rate"]["psnr"]  # None when curves don't overlap
    assert [i["name"] for i in result["dataset"]["images"]] == ["kodim01.png", "kodim23.png"]
    json.loads(json.dumps(result))
    written = plot_rd(result, tmp_path)
    assert [p.name for p in written] == ["rd_psnr.png", "rd_ms_ssim.png", "rd_lpips.png"]
    assert all(p.stat().st_size > 10_000 for p in written)


def test_codec_object_api_and_bad_decoder(images_dir, checkpoint):
    """Any object following the protocol works; a decoder returning the wrong shape is an
    error, not a silent result."""
    _, codec, params = checkpoint
    images = load_images(images_dir, limit=1)
    ok = evaluate_rd([codec_point(codec, params, label="mine")], images, progress=False)
    assert ok["curves"]["diffjax hyperprior"][0]["label"] == "mine"

    class Broken:
        name = "broken"

        def encode(self, params, image):
            return b"\x01\x02"

        def decode(self, params, data):
            return np.zeros((8, 8, 3), np.uint8)

    with pytest.raises(Exception, match="decoded uint8"):
        evaluate_rd([codec_point(Broken(), None)], images, progress=False)


def test_cli_end_to_end(images_dir, checkpoint, tmp_path, capsys):
    workdir, _, _ = checkpoint
    out = tmp_path / "out"
    ref = REPO / "results/kodak/published/compressai-bmshj2018-hyperprior_mse_cpu.json"
    rc = main(["eval", str(images_dir), "--codec", str(workdir), "--baselines", "webp",
               "--sweep", "webp=30,70", "--anchor", "webp", "--reference", str(ref),
               "--out", str(out), "--keep-bitstreams", "--no-progress"])
    assert rc == 0
    result = json.loads((out / "rd.json").read_text())
    assert set(result["curves"]) == {"diffjax hyperprior", "WebP"}
    assert result["references"]["CompressAI bmshj2018-hyperprior (MSE)"]["bpp"][0] == \
        pytest.approx(0.1313, abs=1e-4)
    assert len(list((out / "bitstreams").rglob("*.bin"))) == 3 * 2
    assert "BD-rate vs WebP" in (out / "bd_rate.md").read_text()
    assert (out / "rd_ms_ssim.png").is_file()
    assert "WebP" in capsys.readouterr().out


@pytest.mark.parametrize("argv, match", [
    (["eval", "/nonexistent", "--baselines", "jpeg", "--out", "X"], "not a directory"),
    (["eval", "IMG", "--codec", "hyperprior", "--out", "X"], "random-init"),
    (["eval", "IMG", "--baselines", "jpeg2000", "--out", "X"], "unknown image baseline"),
    (["eval", "IMG", "--baselines", "jpeg", "--sweep", "webp=1", "--out", "X"], "not selected"),
    (["eval", "IMG", "--out", "X"], "nothing to evaluate"),
    (["eval", "IMG", "--codec", "nosuchcodec", "--out", "X"], "not a checkpoint path"),
])
def test_cli_errors_are_one_line(argv, match, images_dir, tmp_path, capsys):
    argv = [str(images_dir) if a == "IMG" else str(tmp_path / "o") if a == "X" else a
            for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("diffjax eval: error:") and match in err and "\n" not in err


def test_checkpoint_errors(tmp_path):
    from diffjax.codecs.pretrained import NoWeightsError

    with pytest.raises(NoWeightsError, match="does not exist"):
        checkpoint_point(tmp_path / "nothing")
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    (tmp_path / "empty" / "config.json").write_text('{"task": {"name": "rate_distortion"}}')
    with pytest.raises(NoWeightsError, match="no finished checkpoint"):
        checkpoint_point(tmp_path / "empty")
    (tmp_path / "other").mkdir()
    with pytest.raises(NoWeightsError, match="neither a model folder"):
        checkpoint_point(tmp_path / "other")
    with pytest.raises(Exception, match="CompressAI-style"):
        load_reference(tmp_path / "nothing.json")
    assert issubclass(BitstreamError, Exception)


@pytest.mark.slow
def test_cli_random_init_codec_with_fid_kid(images_dir, tmp_path):
    """``--codec NAME --random-init`` and ``--fid`` (whole images: they are < 256 px)."""
    out = tmp_path / "fid"
    rc = main(["eval", str(images_dir), "--codec", "hyperprior", "--random-init",
               "--codec-kwargs", '{"N": 8, "M": 12}', "--baselines", "jpeg", "--sweep",
               "jpeg=90", "--fid", "--out", str(out), "--no-progress"])
    assert rc == 0
    result = json.loads((out / "rd.json").read_text())
    assert result["settings"]["fid_mode"] == "whole images"
    (jpeg,) = result["curves"]["JPEG"]
    (rand,) = result["curves"]["diffjax hyperprior (random init)"]
    # a random network is far from the data, JPEG q=90 is close
    assert 0 <= jpeg["fid"] < rand["fid"] and np.isfinite(jpeg["kid"])
    assert (out / "rd_fid.png").is_file()
