"""TAESD-family port vs a torch reference on the real TAEF2 / TAESana weights.

The torch reference below is the architecture of ``taesd.py`` from
github.com/madebyollin/taesd (commit 5cccb12, "Add support for FLUX.2 VAE": ``Block`` with
the ``use_midblock_gn`` pool branch, ``Encoder``/``Decoder``/``F32Encoder``), loaded with
``torch.load`` of the same files that diffjax reads without torch.
"""
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn as tnn

from diffjax.errors import CheckpointError, InputError
from diffjax.models import taesd

TOL = 1e-4


# ---- torch reference (architecture of madebyollin/taesd taesd.py) --------------------------
def _tconv(n_in, n_out, **kw):
    return tnn.Conv2d(n_in, n_out, 3, padding=1, **kw)


class _Clamp(tnn.Module):
    def forward(self, x):
        return torch.tanh(x / 3) * 3


class _Block(tnn.Module):
    def __init__(self, n_in, n_out, use_midblock_gn=False):
        super().__init__()
        self.conv = tnn.Sequential(_tconv(n_in, n_out), tnn.ReLU(), _tconv(n_out, n_out),
                                   tnn.ReLU(), _tconv(n_out, n_out))
        self.skip = tnn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else tnn.Identity()
        self.fuse = tnn.ReLU()
        self.pool = None
        if use_midblock_gn:
            n_gn = n_in * 4
            self.pool = tnn.Sequential(tnn.Conv2d(n_in, n_gn, 1, bias=False), tnn.GroupNorm(4, n_gn),
                                       tnn.ReLU(inplace=True), tnn.Conv2d(n_gn, n_in, 1, bias=False))

    def forward(self, x):
        if self.pool is not None:
            x = x + self.pool(x)
        return self.fuse(self.conv(x) + self.skip(x))


def _t_encoder(c, gn):
    return tnn.Sequential(
        _tconv(3, 64), _Block(64, 64),
        _tconv(64, 64, stride=2, bias=False), _Block(64, 64), _Block(64, 64), _Block(64, 64),
        _tconv(64, 64, stride=2, bias=False), _Block(64, 64), _Block(64, 64), _Block(64, 64),
        _tconv(64, 64, stride=2, bias=False), _Block(64, 64, gn), _Block(64, 64, gn), _Block(64, 64, gn),
        _tconv(64, c))


def _t_decoder(c, gn):
    return tnn.Sequential(
        _Clamp(), _tconv(c, 64), tnn.ReLU(),
        _Block(64, 64, gn), _Block(64, 64, gn), _Block(64, 64, gn), tnn.Upsample(scale_factor=2),
        _tconv(64, 64, bias=False),
        _Block(64, 64), _Block(64, 64), _Block(64, 64), tnn.Upsample(scale_factor=2),
        _tconv(64, 64, bias=False),
        _Block(64, 64), _Block(64, 64), _Block(64, 64), tnn.Upsample(scale_factor=2),
        _tconv(64, 64, bias=False),
        _Block(64, 64), _tconv(64, 3))


def _t_f32_encoder(c):
    return tnn.Sequential(
        _tconv(3, 32, stride=2), tnn.ReLU(inplace=True), _tconv(32, 64, stride=2), tnn.ReLU(inplace=True),
        _Block(64, 64),
        _tconv(64, 64, stride=2, bias=False), _Block(64, 64), _Block(64, 64), _Block(64, 64),
        _tconv(64, 64, stride=2, bias=False), _Block(64, 64), _Block(64, 64), _Block(64, 64),
        _tconv(64, 64, stride=2, bias=False), _Block(64, 64), _Block(64, 64), _Block(64, 64),
        _tconv(64, c))


def _torch_model(net, path):
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))  # strict
    return net.float().eval()


# ---- fixtures ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def taesd_dir(shared_data):
    return shared_data / "taesd"


@pytest.fixture(scope="module")
def image(shared_data):
    """Two real 64x64 crops (Kodak kodim23 and kodim05) in [0, 1]."""
    from PIL import Image

    crops = []
    for name, (top, left) in (("kodim23.png", (200, 300)), ("kodim05.png", (100, 400))):
        img = np.asarray(Image.open(shared_data / "kodak" / name).convert("RGB"))
        crops.append(img[top:top + 64, left:left + 64])
    return (np.stack(crops) / 255.0).astype(np.float32)


def _torch_apply(net, x_nhwc):
    with torch.no_grad():
        out = net(torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2))))
    return out.numpy().transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def taef2(taesd_dir):
    enc, enc_p = taesd.load_taesd(taesd_dir / "taef2_encoder.pth")
    dec, dec_p = taesd.load_taesd(taesd_dir / "taef2_decoder.pth")
    return (jax.jit(lambda p, x: enc.apply({"params": p}, x)), enc_p,
            jax.jit(lambda p, y: dec.apply({"params": p}, y)), dec_p, enc, dec)


# ---- parity ----------------------------------------------------------------------------------
def test_taef2_architecture_is_inferred(taef2):
    *_, enc, dec = taef2
    assert (enc.latent_channels, enc.arch_variant, enc.factor) == (32, "flux_2", 8)
    assert (dec.latent_channels, dec.arch_variant) == (32, "flux_2")


def test_taef2_encoder_matches_torch(taef2, taesd_dir, image):
    enc_fn, enc_p, *_ = taef2
    ref = _torch_apply(_torch_model(_t_encoder(32, True), taesd_dir / "taef2_encoder.pth"), image)
    got = np.asarray(enc_fn(enc_p, jnp.asarray(image)))
    assert got.shape == (2, 8, 8, 32) == ref.shape
    assert np.abs(ref).max() > 0.5  # a real, non-degenerate latent
    np.testing.assert_allclose(got, ref, atol=TOL, rtol=0)


def test_taef2_decoder_matches_torch(taef2, taesd_dir, image):
    enc_fn, enc_p, dec_fn, dec_p, *_ = taef2
    latent = np.asarray(enc_fn(enc_p, jnp.asarray(image)))
    ref = _torch_apply(_torch_model(_t_decoder(32, True), taesd_dir / "taef2_decoder.pth"), latent)
    got = np.asarray(dec_fn(dec_p, jnp.asarray(latent)))
    assert got.shape == (2, 64, 64, 3) == ref.shape
    np.testing.assert_allclose(got, ref, atol=TOL, rtol=0)
    # the real weights reconstruct the image (a random-weight port would not)
    psnr = -10 * np.log10(np.mean((np.clip(got, 0, 1) - image) ** 2))
    assert psnr > 20, psnr


def test_taesana_f32_encoder_matches_torch(taesd_dir, image):
    enc, params = taesd.load_taesd(taesd_dir / "taesana_encoder.pth")
    assert (enc.latent_channels, enc.arch_variant, enc.factor) == (32, "f32", 32)
    ref = _torch_apply(_torch_model(_t_f32_encoder(32), taesd_dir / "taesana_encoder.pth"), image)
    got = np.asarray(enc.apply({"params": params}, jnp.asarray(image)))
    assert got.shape == (2, 2, 2, 32) == ref.shape
    np.testing.assert_allclose(got, ref, atol=TOL, rtol=0)


def test_reader_matches_torch_load_exactly(taesd_dir):
    ours = taesd.read_torch_state_dict(taesd_dir / "taef2_decoder.pth")
    ref = torch.load(taesd_dir / "taef2_decoder.pth", map_location="cpu", weights_only=True)
    assert list(ours) == list(ref) and len(ours) == 79
    for k, v in ref.items():
        assert ours[k].dtype == np.float16
        np.testing.assert_array_equal(ours[k], v.numpy())


def test_latent_scaling_roundtrip():
    x = jnp.linspace(-2.9, 2.9, 11)
    np.testing.assert_allclose(taesd.unscale_latents(taesd.scale_latents(x)), x, atol=1e-6)
    assert float(taesd.scale_latents(jnp.array(10.0))) == 1.0


@pytest.mark.slow
def test_bf16_compute_close_to_fp32(taef2, image):
    enc_fn, enc_p, *_ = taef2
    bf = taesd.TAESDEncoder(32, "flux_2", dtype=jnp.bfloat16)
    x = jnp.asarray(image[:1, :32, :32])
    got = jax.jit(bf.apply)({"params": enc_p}, x)
    assert got.dtype == jnp.bfloat16
    ref = enc_fn(enc_p, x)
    assert float(jnp.max(jnp.abs(got.astype(jnp.float32) - ref))) < 0.1 * float(jnp.max(jnp.abs(ref)))


# ---- strict loading / bad input --------------------------------------------------------------
def _save(tmp_path, state, name="ckpt.pth"):
    path = tmp_path / name
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def torch_state(taesd_dir):
    return torch.load(taesd_dir / "taef2_encoder.pth", map_location="cpu", weights_only=True)


def test_missing_and_unexpected_keys_are_listed(tmp_path, torch_state):
    state = dict(torch_state)
    del state["12.pool.1.bias"]
    state["99.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointError) as err:
        taesd.load_taesd(_save(tmp_path, state))
    msg = str(err.value)
    assert "missing: layers_12/pool_1/bias" in msg and "unexpected: 99.weight" in msg


def test_wrong_shape_is_listed(tmp_path, torch_state):
    state = dict(torch_state)
    state["5.conv.2.weight"] = torch.zeros(64, 64, 1, 1)
    with pytest.raises(CheckpointError, match=r"wrong shape: 5\.conv\.2\.weight \(64, 64, 1, 1\)"):
        taesd.load_taesd(_save(tmp_path, state))


def test_forced_variant_mismatch_is_refused(taesd_dir):
    with pytest.raises(CheckpointError, match="unexpected: 11.pool.0.weight"):
        taesd.load_taesd(taesd_dir / "taef2_encoder.pth", arch_variant=None)


def test_foreign_globals_are_refused(tmp_path):
    path = _save(tmp_path, {"w": torch.zeros(2), "fn": np.sum})  # a pickled callable
    with pytest.raises(CheckpointError, match="refusing to load"):
        taesd.read_torch_state_dict(path)


def test_not_a_zip_and_truncated_file(tmp_path, taesd_dir):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError):
        taesd.load_taesd(junk)
    cut = tmp_path / "cut.pth"
    cut.write_bytes((taesd_dir / "taef2_encoder.pth").read_bytes()[:100_000])
    with pytest.raises(CheckpointError):
        taesd.load_taesd(cut)
    # a zip whose storage is short
    short = tmp_path / "short.pth"
    with zipfile.ZipFile(taesd_dir / "taef2_encoder.pth") as src, zipfile.ZipFile(short, "w") as dst:
        for name in src.namelist():
            data = src.read(name)
            dst.writestr(name, data[:-2] if name.endswith("/data/3") else data)
    with pytest.raises(CheckpointError, match="storage 3"):
        taesd.load_taesd(short)


def test_bad_arguments():
    with pytest.raises(InputError, match="arch_variant"):
        taesd.encoder_layers(4, "flux_3")
    with pytest.raises(AssertionError):  # chex shape check at the public boundary
        taesd.TAESDDecoder(32, "flux_2").init(jax.random.key(0), jnp.zeros((1, 4, 4, 16)))
