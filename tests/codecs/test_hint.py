"""The hint-guided video codec (IKIN, issue 26) on the tiny ``smoke`` model.

One encode of 3 frames (18x26, odd window padding: 2 windows of 2) of a training clip with
a one-level SD-layout UNet, a motion module, a canny ControlNet and the colour hint as the
start image, all random (``experiments/configs/hint.py:smoke``):

* the file decodes in a fresh process (``diffjax decompress`` with the model folder) to the
  frames this process decodes, bit for bit;
* every hint section is a plain H.264 stream: ``ffmpeg`` decodes it to the pictures the
  receiver conditions on, and those are the transmitter's;
* the LoRA section unpacks to the adapter the transmitter trained (8-bit quantised);
* the section sizes add up to the file; damaged sections inside a valid container, damaged
  containers, a foreign model and bad settings get typed errors;
* the depth sources (folder, video, callable) and the temporal median filter.

Slow tier: a depth ControlNet, control-LoRAs, H.265 hints, sampling from noise and the output
median filter; the real TAEF2 first stage; the model assembled from `diffjax convert`
directories (same fingerprint as from configs).
"""
import os
import pathlib
import subprocess
import sys
import zlib

import jax
import numpy as np
import pytest

import diffjax.codecs
from diffjax.codecs import hint_guidance as G
from diffjax.codecs import pretrained
from diffjax.codecs.hint import PRESETS, HintCodec
from diffjax.entropy import bitstream as B
from diffjax.entropy.info import describe
from diffjax.errors import BitstreamError, InputError
from diffjax.io.video import read_video, write_video
from diffjax.nn import lora as L
from experiments.configs.hint import build, get_config

sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "entropy"))
from bitstream_fuzz import fuzz_cases, run_fuzz, section_cases  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, shared_data):
    """(codec, params, model folder, frames, fps, transmission)."""
    root = tmp_path_factory.mktemp("hint")
    kwargs, params = build(get_config("smoke"))
    pretrained.save_model(root / "model", "hint", kwargs, params)
    codec, params = diffjax.codecs.load(root / "model")
    frames, fps = read_video(next((shared_data / "video_clips").glob("carphone*")), max_frames=3)
    frames = np.ascontiguousarray(frames[:, 40:58, 60:86])
    sent = codec.transmit_clip(params, frames, fps=fps)
    return codec, params, root / "model", frames, fps, sent


def test_fresh_process_decode_is_bit_identical(tiny, tmp_path):
    codec, params, model, frames, fps, sent = tiny
    (tmp_path / "c.djx").write_bytes(sent.data)
    env = {**os.environ, "DIFFJAX_COMPILATION_CACHE": "0"}
    # the fresh process decodes while this one does (the two compilations overlap)
    proc = subprocess.Popen([sys.executable, "-m", "diffjax", "decompress",
                             str(tmp_path / "c.djx"), "-o", str(tmp_path / "d.mkv"), "--model",
                             str(model)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        decoded = codec.decode(params, sent.data)
    finally:
        _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr
    assert decoded.shape == frames.shape and decoded.dtype == np.uint8
    assert decoded.std() > 1.0  # not a constant picture
    there, there_fps = read_video(tmp_path / "d.mkv")  # FFV1: lossless
    np.testing.assert_array_equal(there, decoded)
    assert there_fps == fps


def test_hint_sections_are_plain_ffmpeg_streams(tiny, tmp_path):
    codec, params, _, frames, _, sent = tiny
    parts = codec.split(params, sent.data)
    assert list(parts["hints"]) == ["canny", "colour"] == list(codec.transmit)
    for name, hint in parts["hints"].items():
        stream = sent.sections[f"hint/{name}"]
        (tmp_path / f"{name}.h264").write_bytes(stream)
        raw = subprocess.run(["ffmpeg", "-v", "error", "-i", str(tmp_path / f"{name}.h264"),
                              "-f", "rawvideo", "-pix_fmt", "rgb24", "-"], capture_output=True,
                             check=True).stdout
        h, w = hint["size"]
        assert (h, w) == G.stream_size(18, 26, PRESETS["exp1"][name]["scale"]) == \
            {"canny": (16, 16), "colour": (18, 26)}[name]  # 1/2 (at least 16 px), full size
        plain = np.frombuffer(raw, np.uint8).reshape(3, h, w, 3)
        np.testing.assert_array_equal(hint["pictures"], plain)           # what the receiver used
        np.testing.assert_array_equal(sent.hints[name]["pictures"], plain)  # = the transmitter's
        assert hint["crf"] == 51 and hint["codec"] == "h264"
    # the colour stream codes the frames, the canny stream their edges (thresholds 100/200)
    colour = parts["hints"]["colour"]["pictures"].astype(int)
    assert np.abs(colour - frames).mean() < 40
    edges = G.canny(frames, 100, 200)
    assert 0 < edges.mean() < 255 and set(np.unique(edges)) <= {0, 255}


def test_lora_section_is_the_trained_adapter(tiny):
    codec, params, _, _, _, sent = tiny
    trained = sent.lora["lora"]
    got = L.unpack(sent.sections["lora"], like=params["unet"])
    np.testing.assert_equal(got, L.unpack(L.pack(trained, 8)))
    assert sorted(L.entries(got)) == sorted(L.entries(trained))
    assert len(sent.losses) == 2 and all(np.isfinite(sent.losses))
    # trained away from the identity (attn2's to_v sees the zeros context: no gradient)
    assert any(float(np.abs(e["up"]).max()) > 0 for e in L.entries(trained).values())
    for path, entry in L.entries(trained).items():
        for k in ("down", "up"):
            step = np.abs(entry[k]).max(axis=tuple(range(entry[k].ndim - 1))) / 127
            assert np.all(np.abs(L.entries(got)[path][k] - entry[k]) <= step / 2 + 1e-6)
    assert codec.split(params, sent.data)["lora"].keys() == got.keys()


def test_every_byte_is_counted(tiny):
    codec, params, _, _, _, sent = tiny
    data = sent.data
    info = describe(data)
    assert info["codec"] == "hint" and info["frames"] == 3
    assert info["header_bytes"] + sum(info["section_bytes"]) == len(data)
    assert info["section_bytes"] == [len(s) for s in sent.sections.values()]
    assert info["section_names"] == list(sent.sections)  # what `diffjax info` prints
    sizes = codec.split(params, data)["sizes"]
    assert sum(sizes.values()) == len(data)
    assert set(sizes) == {"container", "settings", "lora", "hint/canny", "hint/colour"}


def test_damaged_files_get_typed_errors(tiny):
    codec, params, _, _, _, sent = tiny
    data = sent.data
    decode = lambda d: codec.split(params, d)  # noqa: E731 - everything is verified there
    for index, n in ((0, 12), (1, 12), (2, 4), (3, 4)):  # settings, LoRA, canny, colour
        for k, bad in enumerate(section_cases(data, index, n, seed=index)):
            try:
                decode(bad)
            except BitstreamError:
                continue
            pytest.fail(f"section {index}, case {k}: {B.unpack(bad)[1][index].hex()} vs "
                        f"{B.unpack(data)[1][index].hex()} decoded")
    run_fuzz(decode, data, fuzz_cases(data, 100, seed=5), per_case_s=5.0)
    other = dict(params, unet=dict(params["unet"], conv_in={
        k: v + 1 for k, v in params["unet"]["conv_in"].items()}))
    with pytest.raises(B.WrongModelError):
        codec.decode(params=other, data=data)


def test_settings_and_presets(tiny):
    codec, params, model, frames, _, _ = tiny
    kwargs = pretrained.load_model(model).config
    for preset in ("exp1", "exp2"):
        c = HintCodec(**{**kwargs, "preset": preset, "hint_codec": "h265"})
        for name, want in PRESETS[preset].items():
            cfg = c.hint_settings[name]
            assert (cfg["scale"], cfg["crf"], cfg["codec"]) == (want["scale"], 51, "h265")
    assert G.stream_size(480, 640, 0.25) == (120, 160) and G.stream_size(480, 640, 0.5) == \
        (240, 320)
    c = HintCodec(**{**kwargs, "hints": {"canny": {"crf": 40, "low": 50, "scale": 0.25}}})
    assert c.hint_settings["canny"] == {"codec": "h264", "control_scale": 1.0, "low": 50,
                                        "high": 200, "scale": 0.25, "crf": 40}
    bad = [{"preset": "exp3"}, {"hint_codec": "vp9"}, {"hints": {"canny": {"crf": 60}}},
           {"hints": {"canny": {"blur": 1}}}, {"hints": {"edges": {}}}, {"transmit": ["depth"]},
           {"strength": 0.0}, {"window": 9}, {"lora_bits": 3}, {"steps": 0},
           {"transmit": ["colour"]}]
    for b in bad:
        with pytest.raises(InputError):
            HintCodec(**{**kwargs, **b})
    with pytest.raises(InputError):
        codec.encode(params, frames[..., 0])


def test_depth_sources_and_median(tmp_path):
    frames = np.random.default_rng(0).integers(0, 256, (4, 12, 10, 3), np.uint8)
    depth = np.random.default_rng(1).random((4, 6, 5)).astype(np.float32) * 7 + 1
    want = G.depth_pictures(lambda f: depth, frames)
    assert want.shape == frames.shape and want.min() == 0 and want.max() == 255
    folder = tmp_path / "depth"
    folder.mkdir()
    for i, d in enumerate(depth):
        np.save(folder / f"{i:03d}.npy", d)
    np.testing.assert_array_equal(G.depth_pictures(str(folder), frames), want)
    grey = np.repeat(np.rint(depth / 8 * 255).astype(np.uint8)[..., None], 3, -1)
    grey = np.pad(grey, ((0, 0), (0, 0), (0, 1), (0, 0)), mode="edge")  # even sides
    write_video(tmp_path / "depth.mkv", grey, fps=25)
    assert G.depth_pictures(str(tmp_path / "depth.mkv"), frames).shape == frames.shape
    x = np.arange(5, dtype=np.float32)[:, None] * np.array([1, -1], np.float32)
    x[2] = 100.0
    # x[:, 0] = 0, 1, 100, 3, 4
    np.testing.assert_array_equal(G.temporal_median(x, 1)[:, 0], [0.5, 1, 3, 4, 3.5])
    for source in (None, str(tmp_path / "missing"), lambda f: depth[:2]):
        with pytest.raises(InputError):
            G.depth_pictures(source, frames)


@pytest.mark.slow
def test_depth_control_lora_h265_median(shared_data):
    """The paths the default tier leaves out: a depth ControlNet fed by a callable (with the
    depth median), control-LoRAs (4-bit), H.265 hints, sampling from noise, the output
    median filter, a last window edge-padded (5 frames, windows of 3)."""
    from experiments.configs.hint import tiny_controlnet_config

    c = get_config("smoke")
    c.parts.controlnet_configs = {"canny": tiny_controlnet_config(),
                                  "depth": tiny_controlnet_config()}
    c.codec.update(strength=1.0, hint_codec="h265", control_lora_rank=2, lora_bits=4, window=3,
                   output_median_radius=1)
    c.codec.hints = {"depth": {"median_radius": 1, "scale": 0.25, "crf": 40}}
    kwargs, params = build(c)
    codec = HintCodec(**kwargs)
    frames, fps = read_video(next((shared_data / "video_clips").glob("carphone*")), max_frames=5)
    frames = np.ascontiguousarray(frames[:, 40:58, 60:86])
    depth = frames.astype(np.float32).mean(-1)
    with pytest.raises(InputError, match="depth source"):
        codec.encode(params, frames, fps=fps)
    sent = codec.transmit_clip(params, frames, fps=fps, depth=lambda f: depth)
    parts = codec.split(params, sent.data)
    assert list(parts["hints"]) == ["canny", "depth"] and parts["start_step"] == 0
    assert {k: (v["codec"], v["crf"]) for k, v in parts["hints"].items()} == \
        {"canny": ("h265", 51), "depth": ("h265", 40)}
    assert sorted(parts["control_lora"]) == ["canny", "depth"]
    assert sum(parts["sizes"].values()) == len(sent.data)
    np.testing.assert_array_equal(
        parts["hints"]["depth"]["pictures"],
        G.decode_hint(sent.sections["hint/depth"], "h265", (16, 16), 5,
                      zlib.crc32(sent.sections["hint/depth"])))
    out = codec.decode(params, sent.data)
    np.testing.assert_array_equal(out, codec.decode(params, sent.data))
    raw = np.stack(list(codec._frames(params, {**parts, "output_median_radius": 0})))
    want = [np.median(raw[max(0, i - 1):i + 2], axis=0).round() for i in range(5)]
    np.testing.assert_array_equal(out, np.stack(want).astype(np.uint8))
    assert not np.array_equal(raw, out)


@pytest.mark.slow
def test_taef2_first_stage(shared_data):
    """The codec in the real TAEF2 latent space (32 channels, /8; ``../shared/data/taesd``)
    with a random 32-channel UNet and a /8 canny ControlNet."""
    from experiments.configs.hint import TINY_UNET, tiny_controlnet_config
    from experiments.configs.taef2_denoiser import TAEF2

    c = get_config("smoke")
    unet = dict(TINY_UNET, in_channels=32, out_channels=32)
    c.parts.update(vae="taesd", vae_config=dict(TAEF2), taesd_dir=str(shared_data / "taesd"),
                   unet_config=unet, controlnet_configs={"canny": dict(
                       tiny_controlnet_config(unet),
                       conditioning_embedding_out_channels=[4, 4, 4, 8])})
    kwargs, params = build(c)
    codec = HintCodec(**kwargs)
    frames, fps = read_video(next((shared_data / "video_clips").glob("carphone*")), max_frames=2)
    frames = np.ascontiguousarray(frames[:, 40:70, 60:93])  # 30x33: padded to 32x40
    data = codec.encode(params, frames, fps=fps)
    out = codec.decode(params, data)
    assert out.shape == frames.shape
    np.testing.assert_array_equal(out, codec.decode(params, data))


@pytest.mark.slow
def test_assemble_from_converted_parts(tiny, tmp_path):
    """The real parts plug in as `diffjax convert` directories: a UNet, a ControlNet and a
    motion UNet (only its temporal layers are kept); the first stage from its config."""
    import flax

    from diffjax.codecs.hint_model import assemble
    from diffjax.convert.core import save_pretrained
    from diffjax.models.unet3d import merge_motion_params

    codec, params, model, _, _, _ = tiny
    kwargs = pretrained.load_model(model).config
    to_np = lambda t: flax.core.unfreeze(jax.tree.map(np.asarray, t))  # noqa: E731
    save_pretrained(tmp_path / "unet", codec.unet, to_np(params["unet"]))
    save_pretrained(tmp_path / "canny", codec.controlnets["canny"],
                    to_np(params["controlnets"]["canny"]))
    save_pretrained(tmp_path / "motion", codec.motion,
                    to_np(merge_motion_params(params["unet"], params["motion"])))
    parts = dict(vae="sd", vae_config=kwargs["vae_config"], unet=str(tmp_path / "unet"),
                 controlnets={"canny": str(tmp_path / "canny")}, motion=str(tmp_path / "motion"),
                 scheduler_config=kwargs["scheduler_config"], seed=0)
    got_kwargs, got = assemble(parts, strength=0.5, fast_compile=True)
    rebuilt = HintCodec(**got_kwargs)
    assert rebuilt.fingerprint(dict(got, vae=params["vae"])) == codec.fingerprint(params)
    assert got_kwargs["adapter_config"]["motion_max_seq_length"] == 8
    with pytest.raises(InputError, match="does not exist"):
        assemble(dict(parts, unet=str(tmp_path / "nothing")))
    with pytest.raises(InputError, match="expected UNet2DConditionModel"):
        assemble(dict(parts, unet=str(tmp_path / "canny")))



def test_lora_frame_batches():
    from diffjax.codecs.hint_lora import frame_batches

    idx = frame_batches(5, 2, 5, seed=3)  # two passes over the clip, each a permutation
    assert idx.shape == (5, 2) and sorted(idx.reshape(-1)) == sorted(list(range(5)) * 2)
    np.testing.assert_array_equal(idx, frame_batches(5, 2, 5, seed=3))
    assert not np.array_equal(idx, frame_batches(5, 2, 5, seed=4))
    assert frame_batches(5, 2, 0, seed=3).shape == (0, 2)
