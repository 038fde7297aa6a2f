"""The shipped residual-codec weights load and, re-measured, reproduce the committed Kodak
results and meet issue 7's targets.

``results/kodak/residual.json`` was written by ``experiments/bench_residual.py`` with the
shipped weights (see the model card). Here every number is measured again, by this test's
own loop (encode, base-only and refined decode, :mod:`diffjax.metrics`):

* default tier: two Kodak images at the lowest and highest rate point. The file sizes equal
  the committed per-image rows exactly, PSNR / MS-SSIM / LPIPS of both decoders agree with
  them, and on each image at each point the refined decoder's LPIPS is below the base's.
  The perceptual and speed targets are statements about means and medians over all 24
  images, so two images cannot check them; they can only tie the committed rows (from
  which those means were computed) to the shipped weights.
* slow tier: all 24 images at every rate point, re-measuring the targets themselves: base
  BD-rate vs JPEG <= -30 % (PSNR), at every point the mean refined LPIPS below the mean
  base LPIPS and below AVIF's LPIPS at the same bpp (the committed AVIF curve of
  ``results/kodak/rd.json``, interpolated by ``experiments.bench_residual.lpips_at_bpp``;
  the baseline curves are formed from their committed per-image rows over the images
  measured, which for all 24 is exactly the committed curve and keeps the comparison fair
  when the test is narrowed to fewer images),
  encode + base-only decode under 2 s (medians over the images, compilation excluded), and
  every committed row reproduced.

Speed is checked on the CPU time of this process (all its threads), not wall time: the work
is CPU-bound with at least one thread busy throughout, so on an otherwise idle machine its
wall time is at most its CPU time, and unlike wall time the CPU time does not grow when
other jobs share the cores (the test suite runs beside other work on 2 shared cores). Wall
times are printed beside it.
"""
import json
import pathlib
import statistics
import time

import numpy as np
import pytest

from diffjax import metrics
from diffjax.codecs import pretrained
from diffjax.io.images import read_image

RESULTS = pathlib.Path(__file__).resolve().parents[2] / "results" / "kodak" / "residual.json"
IMAGES = ("kodim01.png", "kodim02.png")
ALL_KODAK = 24
# agreement with the committed rows (same code, same platform: differences are float noise)
TOLERANCE = {"psnr": 0.01, "ms_ssim": 1e-4, "lpips": 1e-3}


@pytest.fixture(scope="module")
def shipped():
    model = pretrained.load_model()  # the shipped weights, no path
    return model, json.loads(RESULTS.read_text())


def _row(results: dict, quality: int, name: str) -> dict:
    point = next(p for p in results["points"] if p["quality"] == quality)
    return next(r for r in point["images"] if r["image"] == name)


def _quality(ref: np.ndarray, out: np.ndarray) -> dict:
    return {"psnr": float(metrics.psnr(ref, out)), "ms_ssim": float(metrics.ms_ssim(ref, out)),
            "lpips": float(metrics.lpips(ref, out))}


def _measure(codec, params, image: np.ndarray, timed: bool = False) -> dict:
    """Bytes, bpp, both decoders' quality, and (``timed``) encode / base-decode seconds."""
    t0, c0 = time.perf_counter(), time.process_time()
    data = codec.encode(params, image)
    t1, c1 = time.perf_counter(), time.process_time()
    base = codec.decode(params, data, steps=0)
    t2, c2 = time.perf_counter(), time.process_time()
    refined = codec.decode(params, data)  # the steps written in the file
    assert base.shape == refined.shape == image.shape and not np.array_equal(base, refined)
    row = {"bytes": len(data), "bpp": 8 * len(data) / (image.shape[0] * image.shape[1]),
           "base": _quality(image, base), "refined": _quality(image, refined)}
    if timed:
        row.update(encode_s=t1 - t0, decode_base_s=t2 - t1, encode_cpu_s=c1 - c0,
                   decode_base_cpu_s=c2 - c1)
    return row


def _curve_on(curve: list, names: set) -> list:
    """A committed baseline curve (``rd.json``) averaged over the images ``names`` only."""
    out = []
    for point in curve:
        rows = [r for r in point["per_image"] if r["image"] in names]
        assert len(rows) == len(names), (point["label"], sorted(names))
        out.append({k: float(np.mean([r[k] for r in rows])) for k in ("bpp", "psnr", "lpips")})
    return out


def _assert_reproduces(row: dict, committed: dict, where) -> None:
    assert row["bytes"] == committed["bytes"], where
    assert row["bpp"] == pytest.approx(committed["bpp"], abs=0), where
    for which in ("base", "refined"):
        for metric, tol in TOLERANCE.items():
            assert row[which][metric] == pytest.approx(committed[which][metric], abs=tol), (
                where, which, metric)


def test_shipped_weights_load(shipped):
    model, results = shipped
    assert model.source == str(pretrained.SHIPPED_DIR)
    assert model.num_qualities == len(results["points"]) >= 4
    assert model.codec().steps == results["steps"]  # the committed refined curve's steps
    # the rate range: about 0.1 to 1 bpp on Kodak, rates increasing with quality
    bpps = [p["bpp"] for p in sorted(results["points"], key=lambda p: p["quality"])]
    assert bpps == sorted(bpps) and bpps[0] < 0.15 and bpps[-1] > 0.8
    assert (pretrained.SHIPPED_DIR / "MODEL_CARD.md").is_file()
    size = (pretrained.SHIPPED_DIR / "params.msgpack").stat().st_size
    assert size < 20 * 2 ** 20


@pytest.mark.parametrize("name", IMAGES)
def test_remeasured_rows_match_and_refiner_lowers_lpips(shipped, shared_data, name):
    """Lowest and highest rate point on one Kodak image, everything measured again."""
    model, results = shipped
    image = read_image(str(shared_data / "kodak" / name))
    for quality in (1, model.num_qualities):
        row = _measure(model.codec(quality=quality), model.params, image)
        _assert_reproduces(row, _row(results, quality, name), (name, quality))
        assert row["refined"]["lpips"] < row["base"]["lpips"], (name, quality, row)
        # the base decoder is the PSNR-oriented one
        assert row["base"]["psnr"] > row["refined"]["psnr"], (name, quality, row)


def test_committed_results_are_consistent():
    """The committed per-point means are the means of the committed per-image rows (what
    the default tier's re-measured rows are checked against), over the 24 images."""
    results = json.loads(RESULTS.read_text())
    for point in results["points"]:
        rows = point["images"]
        assert len(rows) == ALL_KODAK
        assert point["bpp"] == pytest.approx(np.mean([r["bpp"] for r in rows]), rel=1e-12)
        for which in ("base", "refined"):
            for metric in ("psnr", "ms_ssim", "lpips"):
                assert point[which][metric] == pytest.approx(
                    np.mean([r[which][metric] for r in rows]), rel=1e-12)


@pytest.mark.slow
def test_all_kodak_remeasured_meets_the_targets(shipped, shared_data):
    """Issue 7's targets re-measured on all 24 Kodak images at every rate point (see the
    module docstring); every committed row reproduced."""
    from diffjax.metrics.bjontegaard import bd_rate
    from experiments.bench_residual import lpips_at_bpp

    model, results = shipped
    rd = json.loads((RESULTS.parent / "rd.json").read_text())
    paths = sorted((shared_data / "kodak").glob("*.png"))[:ALL_KODAK]
    assert len(paths) == ALL_KODAK
    images = [(p.name, read_image(str(p))) for p in paths]
    names = {name for name, _ in images}
    avif_curve = _curve_on(rd["curves"]["AVIF"], names)
    jpeg = _curve_on(rd["curves"]["JPEG"], names)
    if len(names) == ALL_KODAK:  # the committed curve itself
        assert [c["lpips"] for c in avif_curve] == pytest.approx(
            [c["lpips"] for c in rd["curves"]["AVIF"]], rel=1e-12)
    means = []
    for quality in model.qualities:
        codec = model.codec(quality=quality)
        warmed = set()
        rows = []
        for name, image in images:
            if image.shape not in warmed:  # compile for this size first: timing excludes it
                _measure(codec, model.params, image)
                warmed.add(image.shape)
            row = _measure(codec, model.params, image, timed=True)
            _assert_reproduces(row, _row(results, quality, name), (name, quality))
            rows.append(row)
        mean = {"bpp": float(np.mean([r["bpp"] for r in rows]))}
        for which in ("base", "refined"):
            mean[which] = {m: float(np.mean([r[which][m] for r in rows])) for m in TOLERANCE}
        avif = lpips_at_bpp(avif_curve, mean["bpp"])
        median = lambda key: statistics.median(r[key] for r in rows)  # noqa: E731
        speed = median("encode_cpu_s") + median("decode_base_cpu_s")
        print(f"q{quality}: {mean['bpp']:.4f} bpp, LPIPS base {mean['base']['lpips']:.4f} "
              f"refined {mean['refined']['lpips']:.4f} AVIF {avif:.4f}, PSNR base "
              f"{mean['base']['psnr']:.2f}; encode + base decode (medians) CPU {speed:.3f} s, "
              f"wall {median('encode_s') + median('decode_base_s'):.3f} s")
        assert mean["refined"]["lpips"] < mean["base"]["lpips"], (quality, mean)
        assert mean["refined"]["lpips"] < avif, (quality, mean["refined"]["lpips"], avif)
        assert speed < 2.0, (quality, speed)
        means.append(mean)
    base = bd_rate([c["bpp"] for c in jpeg], [c["psnr"] for c in jpeg],
                   [m["bpp"] for m in means], [m["base"]["psnr"] for m in means])
    print(f"base-only BD-rate vs JPEG (PSNR): {base:+.1f} %")
    assert base <= -30.0
