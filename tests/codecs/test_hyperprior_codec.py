"""The hyperprior codec end to end: exact round trips, size vs estimate, determinism
across processes and thread counts, batch decoding, and robustness to bad files.

Parameters are random but "diversified" (larger latents, spread-out scales, non-zero
means) so that many scale-table rows, escapes and the mean offset are exercised.
"""
import functools
import json
import os
import pathlib
import subprocess
import sys
import time
import zlib

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "entropy"))
from bitstream_fuzz import fuzz_cases, run_fuzz  # noqa: E402

import diffjax.codecs as codecs  # noqa: E402
from diffjax import cli  # noqa: E402
from diffjax.entropy import bitstream, coder  # noqa: E402
from diffjax.entropy.bitstream import CorruptError, WrongCodecError, WrongModelError  # noqa: E402
from diffjax.errors import InputError  # noqa: E402
from diffjax.models.hyperprior import STRIDE  # noqa: E402

N, M = 8, 12
HEADER = bitstream.header_size(2)
# Fixed overhead besides the header: per stream the CRC32 and up to one padding word.
STREAM_OVERHEAD_BITS = 2 * (coder.CHECKSUM_BITS + 32)


def diversify(params, mean_scale: bool, seed: int = 0):
    """Random params with latents large enough and scales/means spread over the table."""
    rng = np.random.default_rng(seed)
    p = jax.tree_util.tree_map(np.array, params)
    p["g_a"]["conv3"]["kernel"] *= 4.0
    bias = p["h_s"]["conv2"]["bias"]
    bias[:M] = np.exp(rng.uniform(np.log(0.05), np.log(40.0), M))
    if mean_scale:
        bias[M:] = rng.uniform(-4.0, 4.0, M)
    return jax.tree_util.tree_map(jnp.asarray, p)


@functools.lru_cache(maxsize=None)
def _make(mean_scale: bool):
    codec = codecs.get("hyperprior", N=N, M=M, mean_scale=mean_scale)
    params = diversify(codec.init(jax.random.key(0, impl="rbg")), mean_scale)
    return codec, params


@pytest.fixture(scope="module", params=[False, True], ids=["scale", "mean_scale"])
def setup(request):
    return _make(request.param)


@pytest.fixture(scope="module")
def kodak(shared_data):
    im = np.asarray(Image.open(shared_data / "kodak" / "kodim01.png").convert("RGB"))
    assert im.shape == (512, 768, 3)
    return im


def _image(h, w, seed=0):
    """A smooth image with noise (natural-ish statistics) of any size."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = 127 + 80 * np.sin(xx[..., None] / 7.0 + np.arange(3)) * np.cos(yy[..., None] / 11.0)
    return np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)


def _reference_decode(codec, params, image):
    """The synthesis stage run directly on the *encoder's* quantised latents and means
    (no entropy decoding, no hyper-decoder on the decoding side). The synthesis transform
    itself is compared with CompressAI in tests/models/test_hyperprior_model.py."""
    lat = codec.latents(params, pad(image)[None])
    x = np.asarray(codec._synthesize(params, lat["y_symbols"], lat["means"]))[0]
    return lat, x[: image.shape[0], : image.shape[1]]


def pad(image):
    return codecs.base.pad_to_multiple(image, STRIDE)


@pytest.mark.parametrize("size", [(37, 61), (1, 1), (65, 129)])
def test_round_trip_symbols_and_image_exact(setup, size):
    codec, params = setup
    image = _image(*size, seed=size[0])
    data = codec.encode(params, image)
    decoded = codec.decode(params, data)
    assert decoded.dtype == np.uint8 and decoded.shape == image.shape
    lat, want = _reference_decode(codec, params, image)
    # Decoded symbols == encoded symbols (each stream decoded with the encoder's indexes).
    header, (z_data, y_data) = bitstream.unpack(data)
    assert (header.height, header.width) == size
    prep = codec._prepared(params)
    z_sym = lat["z_symbols"][0]
    np.testing.assert_array_equal(
        prep.coder.decode_z(z_data, z_sym.shape), z_sym)
    np.testing.assert_array_equal(
        coder.decode(y_data, lat["indexes"][0], codec.y_table), lat["y_symbols"][0])
    # Decoded image == the synthesis transform on the quantised latents, exactly.
    np.testing.assert_array_equal(decoded, want)
    np.testing.assert_array_equal(codec.decoded_latents(params, data),
                                  lat["y_symbols"].astype(np.float32) + lat["means"])
    assert codec.encode(params, image) == data


def check_size_matches_estimate(codec, params, image, random_params=True):
    """Actual payload within 0.5 % (plus fixed overhead) of the model's estimate."""
    data = codec.encode(params, image)
    est = codec.estimate_bits(params, image)
    payload_bits = (len(data) - HEADER) * 8
    lat = codec.latents(params, image[None])
    t = codec.y_table
    v = lat["y_symbols"] - t.offsets[lat["indexes"]]
    escapes = int(((v < 0) | (v >= t.lengths[lat["indexes"]])).sum())
    print(f"{image.shape[1]}x{image.shape[0]} mean_scale={codec.model.mean_scale}: "
          f"{len(data)} bytes, payload {payload_bits} bits, estimate {est['total']:.0f} bits "
          f"({(payload_bits / est['total'] - 1) * 100:+.3f} %), {escapes} escapes, "
          f"{len(np.unique(lat['indexes']))} table rows used")
    assert len(np.unique(lat["indexes"])) > 10
    if random_params:  # the diversified random params must exercise the escape path
        assert escapes > 0
    assert abs(payload_bits - est["total"]) <= 0.005 * est["total"] + STREAM_OVERHEAD_BITS
    decoded = codec.decode(params, data)
    np.testing.assert_array_equal(decoded, _reference_decode(codec, params, image)[1])


@pytest.mark.parametrize("portrait", [False, True], ids=["768x512", "512x768"])
def test_kodak_size_matches_estimate(kodak, portrait):
    """Kodak kodim01 in both orientations, mean-scale model (scale model: slow tier)."""
    image = np.ascontiguousarray(kodak.transpose(1, 0, 2)) if portrait else kodak
    check_size_matches_estimate(*_make(True), image)


def test_batch_decode_equals_one_at_a_time(setup):
    codec, params = setup
    # Three images share the 64x64 padded size (one batched call), one is 128x192.
    images = [_image(37, 61, 1), _image(65, 129, 2), _image(64, 64, 3), _image(1, 1, 4)]
    datas = codec.encode_batch(params, images)
    assert datas == [codec.encode(params, im) for im in images]
    singles = [codec.decode(params, d) for d in datas]
    batch = codec.decode_batch(params, datas)
    for a, b, im in zip(singles, batch, images):
        assert a.shape == im.shape
        np.testing.assert_array_equal(a, b)


_WORKER = r"""
import sys, numpy as np, jax, flax.serialization, diffjax.codecs as codecs
path, mean_scale = sys.argv[1], sys.argv[2] == "1"
codec = codecs.get("hyperprior", N=%d, M=%d, mean_scale=mean_scale)
params = flax.serialization.msgpack_restore(open(path + ".params", "rb").read())
image = np.load(path + ".image.npy")
data = open(path + ".djx", "rb").read()
np.save(path + ".decoded.npy", codec.decode(params, data))
if sys.argv[3] == "1":
    open(path + ".reencoded.djx", "wb").write(codec.encode(params, image))
""" % (N, M)


def test_fresh_process_decodes_bit_identically_with_1_and_2_threads(tmp_path):
    """Two fresh processes (1 and 2 CPU threads, run side by side) decode the file to the
    same pixels; the 1-thread one also re-encodes the image to the same bytes (mean-scale
    model; the scale model shares the code path)."""
    codec, params = _make(True)
    image = _image(65, 129, 5)
    data = codec.encode(params, image)
    decoded = codec.decode(params, data)
    base = tmp_path / "f"
    (tmp_path / "f.params").write_bytes(
        flax.serialization.msgpack_serialize(jax.tree_util.tree_map(np.asarray, params)))
    np.save(tmp_path / "f.image.npy", image)
    (tmp_path / "f.djx").write_bytes(data)
    cpus = sorted(os.sched_getaffinity(0))
    procs = []
    for threads in (1, 2):
        out = tmp_path / f"t{threads}"
        out.mkdir()
        for name in ("f.params", "f.image.npy", "f.djx"):
            (out / name).write_bytes((tmp_path / name).read_bytes())
        env = dict(os.environ, JAX_PLATFORMS="cpu", OMP_NUM_THREADS=str(threads),
                   XLA_FLAGS=("--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
                              if threads == 1 else ""))
        cmd = [sys.executable, "-c", _WORKER, str(out / "f"), "1", str(int(threads == 1))]
        if len(cpus) >= threads:  # pin to exactly `threads` CPUs
            cmd = ["taskset", "-c", ",".join(map(str, cpus[:threads]))] + cmd
        procs.append((out, subprocess.Popen(cmd, env=env)))
    for out, proc in procs:
        assert proc.wait(timeout=300) == 0
        np.testing.assert_array_equal(np.load(out / "f.decoded.npy"), decoded)
    assert (procs[0][0] / "f.reencoded.djx").read_bytes() == data


def test_wrong_model_and_wrong_codec_files(setup):
    codec, params = setup
    image = _image(37, 61)
    data = codec.encode(params, image)
    other = diversify(codec.init(jax.random.key(1, impl="rbg")), codec.model.mean_scale)
    with pytest.raises(WrongModelError):
        codec.decode(other, data)
    # One changed weight changes the fingerprint.
    tweaked = jax.tree_util.tree_map(lambda a: a, params)
    tweaked["g_s"]["deconv3"]["bias"] = params["g_s"]["deconv3"]["bias"].at[0].add(1e-3)
    assert codec.fingerprint(tweaked) != codec.fingerprint(params)
    with pytest.raises(WrongModelError):
        codec.decode(tweaked, data)
    # Another model configuration (other codec config, same codec id) is another model.
    other_codec, other_params = _make(not codec.model.mean_scale)
    with pytest.raises(WrongModelError):
        other_codec.decode(other_params, data)
    # A well-formed file from another codec.
    header, sections = bitstream.unpack(data)
    foreign = bitstream.pack(2, header.fingerprint, sections, height=37, width=61)
    with pytest.raises(WrongCodecError):
        codec.decode(params, foreign)


def test_fuzzed_files_raise_matching_errors_quickly(setup):
    codec, params = setup
    data = codec.encode(params, _image(37, 61))
    cases = fuzz_cases(data, 1500, seed=7)
    start = time.perf_counter()
    _, counts = run_fuzz(lambda d: codec.decode(params, d), data, cases, per_case_s=1.0)
    assert time.perf_counter() - start < 30
    assert {"TruncatedError", "CorruptError", "UnknownVersionError"} <= set(counts), counts


def _recrc(data: bytes, payload: bytes) -> bytes:
    """Same header with a new payload and valid CRCs (damage the CRCs cannot see)."""
    header = bitstream.read_header(data)
    head = bytearray(data[: header.header_size - 4])
    head[38:42] = zlib.crc32(payload).to_bytes(4, "little")
    return bytes(head) + zlib.crc32(bytes(head)).to_bytes(4, "little") + payload


def crc_valid_damage(codec, params, n, seed, per_case_s=2.0):
    """Payload bit flips with recomputed CRCs: the streams' own checks must still catch
    them (Corrupt/WrongModel) or decode to exactly the original image, quickly."""
    image = _image(37, 61)
    data = codec.encode(params, image)
    original = codec.decode(params, data)
    header = bitstream.read_header(data)
    payload = data[header.header_size:]
    rng = np.random.default_rng(seed)
    raised = 0
    for _ in range(n):
        b = bytearray(payload)
        for _ in range(rng.integers(1, 4)):
            b[rng.integers(len(b))] ^= 1 << rng.integers(8)
        start = time.perf_counter()
        try:
            out = codec.decode(params, _recrc(data, bytes(b)))
        except (CorruptError, WrongModelError):
            raised += 1
        else:
            np.testing.assert_array_equal(out, original)
        assert time.perf_counter() - start < per_case_s
    return raised


def test_damage_behind_valid_crcs_is_still_caught(setup):
    codec, params = setup
    assert crc_valid_damage(codec, params, 200, seed=11) >= 190


def test_bad_images_and_broken_params_raise_input_error(setup):
    codec, params = setup
    for bad in (np.zeros((8, 8, 3), np.float32), np.zeros((8, 8), np.uint8),
                np.zeros((8, 8, 4), np.uint8), np.zeros((0, 8, 3), np.uint8)):
        with pytest.raises(InputError):
            codec.encode(params, bad)
    broken = jax.tree_util.tree_map(lambda a: a, params)
    broken["g_a"]["conv0"]["bias"] = params["g_a"]["conv0"]["bias"].at[0].set(jnp.nan)
    with pytest.raises(InputError, match="non-finite"):
        codec.encode(broken, _image(37, 61))
    with pytest.raises(InputError):
        codecs.get("no-such-codec")


def test_registry_and_variables_dict(setup):
    codec, params = setup
    assert "hyperprior" in codecs.available()
    assert codecs.codec_name(codec.codec_id) == "hyperprior"
    image = _image(37, 61)
    assert codec.encode({"params": params}, image) == codec.encode(params, image)
    assert len(codec.fingerprint(params)) == bitstream.FINGERPRINT_BYTES


def test_info_command(setup, tmp_path, capsys):
    codec, params = setup
    path = tmp_path / "x.djx"
    data = codec.encode(params, _image(37, 61))
    path.write_bytes(data)
    assert cli.main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "hyperprior (id 1)" in out and "61x37 px" in out
    assert codec.fingerprint(params).hex() in out and "intact" in out
    assert cli.main(["info", "--json", str(path)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["file_bytes"] == len(data) and info["section_bytes"] == [
        n for n in bitstream.read_header(data).section_lengths]
    assert info["bits_per_pixel"] == pytest.approx(len(data) * 8 / (37 * 61))
    path.write_bytes(data[:-3])
    assert cli.main(["info", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "truncated" in err[0]
    path.write_bytes(b"GIF89a" + bytes(100))
    assert cli.main(["info", str(path)]) == 2
    assert "not a diffjax bitstream" in capsys.readouterr().err
    assert cli.main(["info", str(tmp_path / "missing.djx")]) == 2


@pytest.mark.slow
def test_large_fuzz_and_crc_valid_damage(setup):
    codec, params = setup
    data = codec.encode(params, _image(37, 61))
    for seed in range(4):
        run_fuzz(lambda d: codec.decode(params, d), data, fuzz_cases(data, 5000, seed), 1.0)
    assert crc_valid_damage(codec, params, 3000, seed=99) >= 2950


@pytest.mark.slow
def test_kodak_both_orientations_scale_model(kodak):
    for image in (kodak, np.ascontiguousarray(kodak.transpose(1, 0, 2))):
        check_size_matches_estimate(*_make(False), image)


@pytest.mark.slow
def test_briefly_trained_model_through_orbax(shared_data, kodak, tmp_path):
    """Train a small mean-scale model for a few hundred steps (BSDS500 crops, CompressAI
    loss + aux loss), save/restore its params with Orbax, then code a 768x512 Kodak image:
    exact round trip and payload within 0.5 % of the estimate with trained parameters."""
    import optax
    import orbax.checkpoint as ocp

    from diffjax.models.hyperprior import rate_distortion_loss

    codec = codecs.get("hyperprior", N=16, M=24, mean_scale=True)
    model = codec.model
    params = codec.init(jax.random.key(0, impl="rbg"))
    rng = np.random.default_rng(0)
    crops = []
    for path in sorted((shared_data / "bsds500" / "train").glob("*.jpg"))[:64]:
        im = np.asarray(Image.open(path).convert("RGB"))
        for _ in range(2):
            y0, x0 = rng.integers(0, im.shape[0] - 64), rng.integers(0, im.shape[1] - 64)
            crops.append(im[y0:y0 + 64, x0:x0 + 64])
    crops = np.stack(crops).astype(np.float32) / 255.0
    opt = optax.adam(1e-3)

    @jax.jit
    def step(p, state, x, key):
        def loss_fn(p):
            out = model.apply({"params": p}, x, train=True, rngs={"noise": key})
            loss, metrics = rate_distortion_loss(out, x, lmbda=0.01)
            return loss + model.apply({"params": p}, method="aux_loss"), metrics
        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(p)
        updates, state = opt.update(grads, state, p)
        return optax.apply_updates(p, updates), state, metrics

    state = opt.init(params)
    key = jax.random.key(1, impl="rbg")
    bpp = []
    for i in range(300):
        batch = crops[rng.integers(0, len(crops), 8)]
        params, state, metrics = step(params, state, jnp.asarray(batch), jax.random.fold_in(key, i))
        bpp.append(float(metrics["bpp"]))
    assert np.mean(bpp[-20:]) < 0.5 * np.mean(bpp[:20])  # it did train

    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp_path / "params", params)
    ckpt.wait_until_finished()
    restored = ckpt.restore(tmp_path / "params", jax.tree_util.tree_map(np.zeros_like, params))
    assert codec.fingerprint(restored) == codec.fingerprint(params)
    check_size_matches_estimate(codec, restored, kodak, random_params=False)
