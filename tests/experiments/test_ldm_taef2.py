"""ldm_taef2 (issue 25): config, latent cache, smoke training with exact resume, the
export through ``load_pretrained`` and the measurement script, on a tiny model.

Real TAEF2 encoder/decoder weights (small); tiny UNet; 32-64 px inputs.
"""
import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax.errors import InputError
from diffjax.input import latent_cache
from experiments.configs import ldm_taef2

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data(shared_data):
    if not (shared_data / "taesd" / "taef2_encoder.pth").is_file():
        pytest.skip("no ../shared/data/taesd")
    return shared_data


def test_configs_follow_the_issue():
    from diffjax.models.unet import UNet2DConditionModel

    dev = (ROOT / "DEVELOPERS.md").read_text()
    training_row = next(l for l in dev.splitlines() if l.startswith("| training"))
    for arg, max_params in (("cpu", 20e6), ("gpu", 20e6), ("smoke", 1e6)):
        c = ldm_taef2.get_config(arg)
        kw = c.task.kwargs
        assert c.task.name == "latent_denoiser" and kw.t_max == 1.0
        assert kw.scheduler_config["prediction_type"] == "v_prediction"
        assert kw.scheduler_config["beta_schedule"] == "scaled_linear"
        assert c.data.kind == "latents" and c.ema_decay > 0
        unet = UNet2DConditionModel.from_config(kw.unet_config.to_dict())
        args, kwargs = unet.dummy_inputs()
        shapes = jax.eval_shape(lambda: unet.init(jax.random.key(0), *args, **kwargs))
        n = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))
        assert n * 2 <= 40e6 and n <= max_params, (arg, n)  # float16 export <= 40 MB
        spec = c.data.latent_cache
        paths = list(spec.images) + list(spec.videos)
        assert not any("kodak" in p.lower() or "/test" in p for p in paths)
        for v in spec.videos:  # every clip is in DEVELOPERS.md's training row
            name = pathlib.Path(v).name
            assert name in training_row or pathlib.Path(v).parent.name in training_row, v
    assert ldm_taef2.get_config("").to_dict() == ldm_taef2.get_config("cpu").to_dict()
    gpu = ldm_taef2.get_config("gpu")
    assert gpu.data.crop == 256 and max(gpu.task.kwargs.unet_config.block_out_channels) >= \
        max(ldm_taef2.CPU_UNET["block_out_channels"])
    with pytest.raises(ValueError, match="unknown config"):
        ldm_taef2.get_config("cpu,gpu")


@pytest.fixture(scope="module")
def cache(data, tmp_path_factory):
    """A cache of 1 BSDS500 val image and 2 frames of a training clip, at most 128 px."""
    images = tmp_path_factory.mktemp("bsds500_val")  # the licence note keys on the name
    for f in sorted((data / "bsds500" / "val").glob("*.jpg"))[:1]:
        shutil.copy(f, images / f.name)
    spec = latent_cache.CacheSpec.from_config(dict(
        images=[str(images)], videos=[str(data / "video_clips" / "realshort_320x240.mp4")],
        frames_per_clip=2, max_side=128, encoder=str(data / "taesd" / "taef2_encoder.pth"),
        vae_config=dict(ldm_taef2.TAEF2)))
    path = tmp_path_factory.mktemp("cache")
    latent_cache.ensure_cache(spec, path, progress=False)
    return spec, path


def test_latent_cache_holds_the_encoder_latents_of_each_input_and_its_mirror(cache):
    from diffjax.codecs.foundation import Backbone
    from diffjax.models.taesd import load_taesd

    spec, path = cache
    src = latent_cache.LatentCacheSource(path)
    names = [it["name"] for it in src.items]
    assert len(names) == 3 and names[1:] == ["realshort_320x240.mp4#0", "realshort_320x240.mp4#35"]
    bb = Backbone("taesd", spec.vae_config, ldm_taef2.TINY_UNET, ldm_taef2.SD21_SCHEDULER)
    enc = {"encoder": load_taesd(spec.encoder, kind="encoder")[1]}
    inputs = list(latent_cache.iter_inputs(spec))
    assert max(inputs[0][1].shape[:2]) <= 128 and inputs[0][1].shape[0] % 8 == 0
    assert inputs[1][1].shape == (96, 128, 3)  # 320x240 downscaled to 128 px
    img = inputs[0][1][None].astype(np.float32) / 255.0
    want = np.asarray(jax.jit(bb.encode)(enc, np.concatenate([img, img[:, :, ::-1]])))
    for flipped in (False, True):  # the mirror image's own latent, not a mirrored latent
        got = src.latent(0, flipped).astype(np.float32)
        np.testing.assert_allclose(got, want[int(flipped)], atol=4e-3 * np.abs(want).max())
    assert latent_cache.cache_matches(spec, path)
    assert not latent_cache.cache_matches(
        latent_cache.CacheSpec(**{**spec.__dict__, "frames_per_clip": 3}), path)
    # crops: the right shape, from a latent or its mirror
    ds = latent_cache.latent_dataset(
        {"path": str(path), "crop": 32, "latent_cache": spec.to_json()},
        global_batch_size=4, seed=0, shard_index=0, shard_count=1)
    assert ds[0]["latent"].shape == (4, 4, 4, 32)
    with pytest.raises(InputError, match="multiple of 8"):
        latent_cache.latent_dataset({"path": str(path), "crop": 30,
                                     "latent_cache": spec.to_json()}, global_batch_size=4, seed=0)
    with pytest.raises(InputError, match="at least"):
        latent_cache.LatentCacheSource(path, min_size=(64, 64))
    with pytest.raises(InputError, match="no images and no videos"):
        latent_cache.CacheSpec.from_config({"vae_config": dict(ldm_taef2.TAEF2)})


def _smoke_config(cache_path, spec):
    c = ldm_taef2.get_config("smoke")
    c.data.path = str(cache_path)
    c.data.latent_cache = spec.to_json()
    c.num_train_steps = 4
    c.checkpoint_every = 2
    c.mesh.data = 1  # the 8 fake devices are tested in tests/train
    return c


@pytest.fixture(scope="module")
def whole_run(cache, tmp_path_factory):
    """4 smoke steps in one run (the workdir and the final state)."""
    from diffjax.train.loop import train

    spec, path = cache
    whole = tmp_path_factory.mktemp("whole")
    return whole, train(_smoke_config(path, spec), whole, progress=False)


@pytest.mark.slow  # two more compiled training runs; the loop's resume is tested in tests/train
def test_smoke_training_resumes_exactly(cache, whole_run, tmp_path_factory):
    from diffjax.train.loop import train

    spec, path = cache
    c = _smoke_config(path, spec)
    split = tmp_path_factory.mktemp("split")
    train(c, split, progress=False, stop_after=2)
    resumed = train(c, split, progress=False)
    whole, state = whole_run
    assert int(state.step) == int(resumed.step) == 4
    for a, b in zip(jax.tree.leaves((state.params, state.ema_params)),
                    jax.tree.leaves((resumed.params, resumed.ema_params))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    logs = [[json.loads(l) for l in (w / "metrics.jsonl").read_text().splitlines()]
            for w in (whole, split)]
    assert [m["loss"] for m in logs[0]] == [m["loss"] for m in logs[1]]
    assert all(np.isfinite(m["loss"]) and 0 < m["t"] <= 1.0 for m in logs[0])


@pytest.fixture(scope="module")
def exported(whole_run, tmp_path_factory):
    from experiments.export_ldm import export

    whole = whole_run[0]
    out = tmp_path_factory.mktemp("export") / "ldm_taef2"
    # max_mb below the float32 size: the float16 path the cpu / gpu models take
    return export(str(whole), str(out), max_mb=1.0)


@pytest.mark.slow  # a compiled smoke training (~55 s on 2 cores) and the export / eval on it
def test_export_loads_through_load_pretrained_like_a_converted_unet(whole_run, exported):
    from diffjax.convert import load_pretrained
    from diffjax.convert.core import read_model_config
    from diffjax.models.unet import UNet2DConditionModel

    state = whole_run[1]
    module, params = load_pretrained(exported)
    assert isinstance(module, UNet2DConditionModel) and module.prediction_type == "v_prediction"
    ema = jax.tree.map(np.asarray, state.ema_params["unet"])
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ema)):
        assert a.dtype == jnp.float16
        np.testing.assert_array_equal(np.asarray(a), b.astype(np.float16))
    _, p32 = load_pretrained(exported, param_dtype=jnp.float32)
    x = jnp.ones((1, 8, 8, 32))
    out = module.apply({"params": p32}, x, jnp.array([500.0]), jnp.zeros((1, 1, 16)))
    assert out.shape == x.shape and np.all(np.isfinite(np.asarray(out)))
    meta = read_model_config(exported)["metadata"]
    assert meta["t_max"] == 1.0 and meta["ema"] and meta["step"] == 4
    assert "non-commercial" in meta["license_note"]
    card = (exported / "MODEL_CARD.md").read_text()
    assert "non-commercial research only" in card and "{" not in card
    assert "realshort_320x240.mp4` (2 frames)" in card
    assert (exported / "README.md").is_file()


@pytest.mark.slow  # a compiled smoke training (~55 s on 2 cores) and the export / eval on it
def test_eval_script_on_the_tiny_model(data, exported, tmp_path):
    from experiments import eval_ldm

    refs = tmp_path / "refs"
    refs.mkdir()
    for f in sorted((data / "bsds500" / "test").glob("*.jpg"))[:2]:
        shutil.copy(f, refs / f.name)
    proj = np.random.default_rng(0).standard_normal((3 * 8 * 8, 16)).astype(np.float32)

    def features(params, batch):  # a cheap stand-in for InceptionV3 (tested in tests/metrics)
        small = jax.image.resize(batch, (batch.shape[0], 8, 8, 3), "linear")
        return small.reshape(batch.shape[0], -1) @ proj

    r = eval_ldm.evaluate(str(exported), str(tmp_path / "out"), taesd=str(data / "taesd"),
                          kodak=str(data / "kodak"), bsds_test=str(refs), ts=[0.05, 0.6],
                          gain_images=1, gain_crop=32, grid_samples=2, grid_size=32,
                          fid_samples=3, fid_size=32, steps=3, batch=2, feature_fn=features,
                          progress=False)
    assert [row["t"] for row in r["gain"]] == [0.05, 0.6]
    for row in r["gain"]:
        assert all(np.isfinite(row[k]) for k in ("mse_naive", "mse_model", "gain_db",
                                                  "psnr_naive", "psnr_model"))
    # the naive estimate's error is 1/SNR: it grows with t
    assert r["gain"][1]["mse_naive"] > 10 * r["gain"][0]["mse_naive"]
    assert r["fid"]["num_samples"] == 3 and r["fid"]["num_references"] > 2
    assert np.isfinite(r["fid"]["fid"]) and np.isfinite(r["fid"]["kid"])
    from diffjax.io.images import read_image

    assert read_image(tmp_path / "out" / "samples.png").shape == (2 + 34, 2 + 2 * 34, 3)
    assert json.loads((tmp_path / "out" / "eval.json").read_text())["info"]["step"] == 4
