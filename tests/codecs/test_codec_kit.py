"""The codec kit's promise: a new codec is one file, with no edits anywhere else.

This module defines a small but real codec (a learned per-channel gain, 2x downsampling,
uniform quantisation with a step per rate point, zlib) and its training task, registers
both from here, and drives every generic part with them: training with the generic loop,
export (``experiments/export.py``), save/load (``diffjax.codecs.load``), the CLI
(``compress`` / ``decompress`` / ``info``, images and video) and ``diffjax eval``.
"""
import json
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from diffjax import cli
from diffjax.codecs import base, pretrained
from diffjax.entropy import bitstream
from diffjax.entropy.bitstream import CorruptError
from diffjax.train.task import TASKS, Task

STEPS = {1: 32.0, 2: 16.0, 3: 8.0}  # quantisation step per rate point (1 = smallest files)


@base.register("kit-test")
class GainCodec(base.Codec):
    """x -> gain * x -> 2x box downsampling -> round(v / step) -> zlib; decode inverts it."""

    name = "kit-test"
    codec_id = 150
    qualities = tuple(STEPS)

    def __init__(self, quality: int = 2, factor: int = 2):
        self.quality, self.factor = int(quality), int(factor)

    def fingerprint(self, params) -> bytes:
        return base.fingerprint_pytree(params, f"kit-test/{self.factor}".encode())

    def encode(self, params, image):
        image = base.check_image(image)
        x = base.pad_to_multiple(image, self.factor).astype(np.float32)
        h, w = x.shape[:2]
        f = self.factor
        x = x.reshape(h // f, f, w // f, f, 3).mean((1, 3)) * np.asarray(params["gain"])
        symbols = np.rint(x / STEPS[self.quality]).astype(np.int16)
        return bitstream.pack(self.codec_id, self.fingerprint(params),
                              [zlib.compress(symbols.tobytes(), 9)], height=image.shape[0],
                              width=image.shape[1], quality=self.quality)

    def decode(self, params, data):
        header, (payload,) = bitstream.unpack(data, codec_id=self.codec_id,
                                              fingerprint=self.fingerprint(params))
        f, step = self.factor, STEPS[header.quality]
        hp, wp = -(-header.height // f), -(-header.width // f)
        try:
            symbols = np.frombuffer(zlib.decompress(payload), np.int16).reshape(hp, wp, 3)
        except (zlib.error, ValueError) as err:
            raise CorruptError(f"kit-test payload: {err}") from err
        x = symbols.astype(np.float32) * step / np.asarray(params["gain"])
        x = np.repeat(np.repeat(x, f, 0), f, 1)
        return np.clip(np.rint(x), 0, 255).astype(np.uint8)[:header.height, :header.width]


class GainTask(Task):
    """Trains the gain with a differentiable stand-in of the codec (straight-through
    rounding, rate proxy ``|v| / step``)."""

    codec_name = "kit-test"

    def __init__(self, factor: int = 2, rate_weight: float = 0.01):
        self.factor, self.rate_weight = factor, rate_weight

    def init_params(self, rng, batch_spec):
        return {"gain": jnp.ones((3,), jnp.float32)}

    def loss_fn(self, params, batch, rng, step):
        x = batch["image"].astype(jnp.float32) * 255.0
        b, h, w, c = x.shape
        f = self.factor
        v = x.reshape(b, h // f, f, w // f, f, c).mean((2, 4)) * params["gain"] / STEPS[2]
        q = v + jax.lax.stop_gradient(jnp.round(v) - v)
        y = jnp.repeat(jnp.repeat(q * STEPS[2] / params["gain"], f, 1), f, 2)
        mse = jnp.mean((y - x) ** 2)
        rate = jnp.mean(jnp.abs(v))
        return mse + self.rate_weight * rate, {"mse": mse, "rate": rate}

    def codec_kwargs(self):
        return {"factor": self.factor}

    def provenance(self):
        return {"rate_weight": self.rate_weight}


def _photo(h, w, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    x = 127 + 70 * np.stack([np.sin(xx / 7), np.cos(yy / 5), np.sin((xx + yy) / 11)], -1)
    return np.clip(x + rng.normal(0, 4, x.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, shared_data):
    """Two training steps of GainTask with the generic loop, on BSDS500 train crops."""
    from diffjax.train.loop import train
    from experiments.configs.toy_autoencoder import get_config

    TASKS["kit_test"] = f"{__name__}:GainTask"  # a registry entry, not an edit
    config = get_config("smoke")
    config.task.name = "kit_test"
    config.task.kwargs = {"factor": 2, "rate_weight": 0.01}
    config.data.path = str(shared_data / "bsds500" / "train")
    config.num_train_steps = 2
    config.checkpoint_every = 2
    wd = tmp_path_factory.mktemp("kit") / "run"
    train(config, str(wd), progress=False)
    yield wd
    TASKS.pop("kit_test", None)


def test_new_codec_is_known_everywhere():
    assert "kit-test" in base.available() and base.codec_name(150) == "kit-test"
    with pytest.raises(ValueError, match="already"):  # ids and names stay unique
        base.register("kit-test-2")(type("Other", (GainCodec,), {"name": "x"}))
    with pytest.raises(ValueError, match="diffjax's"):
        base.register("kit-test-3")(type("Clash", (GainCodec,), {"codec_id": 2}))


def test_export_save_load_and_cli(workdir, tmp_path, capsys):
    from experiments import export

    model_dir = tmp_path / "model"
    assert export.main(["--workdir", str(workdir), "--out", str(model_dir)]) == 0
    meta = json.loads((model_dir / "model.json").read_text())
    assert (meta["codec"], meta["kwargs"], meta["step"]) == ("kit-test", {"factor": 2}, 2)
    codec, params = pretrained.load(model_dir, quality=3)
    assert isinstance(codec, GainCodec) and codec.quality == 3
    image = _photo(37, 50)
    data = codec.encode(params, image)
    assert codec.decode(params, data).shape == image.shape
    # the same model read straight from the workdir
    again, params2 = pretrained.load(workdir, quality=3)
    assert again.encode(params2, image) == data

    src = tmp_path / "in.png"
    Image.fromarray(image).save(src)
    djx, png = tmp_path / "in.djx", tmp_path / "out.png"
    assert cli.main(["compress", str(src), "-o", str(djx), "--model", str(model_dir),
                     "--quality", "1"]) == 0
    assert "quality 1" in capsys.readouterr().out
    assert cli.main(["decompress", str(djx), "-o", str(png), "--model", str(model_dir)]) == 0
    with Image.open(png) as im:
        assert im.size == (50, 37)
    capsys.readouterr()
    assert cli.main(["info", "--json", str(djx)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["codec"], info["codec_id"], info["quality"]) == ("kit-test", 150, 1)
    # a quality the codec does not have, and --steps it does not take, are clear errors
    assert cli.main(["compress", str(src), "--model", str(model_dir), "-q", "4"]) == 2
    assert cli.main(["compress", str(src), "--model", str(model_dir), "--steps", "2"]) == 2
    assert "no refinement --steps" in capsys.readouterr().err

    # video through the same image codec: intra-only, streamed back into a frame folder
    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(3):
        Image.fromarray(_photo(20, 24, seed=i)).save(frames / f"f{i}.png")
    vdjx = tmp_path / "clip.djx"
    assert cli.main(["compress", str(frames), "-o", str(vdjx), "--model", str(model_dir)]) == 0
    assert cli.main(["decompress", str(vdjx), "-o", str(tmp_path / "dec"),
                     "--model", str(model_dir)]) == 0
    assert sorted(p.name for p in (tmp_path / "dec").iterdir()) == [
        "frame_00000.png", "frame_00001.png", "frame_00002.png"]


def test_eval_takes_the_new_codec(workdir, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        Image.fromarray(_photo(48, 64, seed=i)).save(images / f"im{i}.png")
    out = tmp_path / "rd"
    assert cli.main(["eval", str(images), "--codec", f"kit-test={workdir}",
                     "--baselines", "jpeg", "--sweep", "jpeg=50", "--out", str(out)]) == 0, \
        capsys.readouterr().err
    rd = json.loads((out / "rd.json").read_text())
    (curve,) = [name for name in rd["curves"] if "kit-test" in name]
    (point,) = rd["curves"][curve]
    assert point["bpp"] > 0 and np.isfinite(point["psnr"])
