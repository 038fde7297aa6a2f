"""grain input pipelines (``diffjax.input``): determinism, per-process shards, transforms,
any image size, video clips (frame folders and PyAV-decoded files) in frame order, prefetch.

Images are tiny generated PNGs whose pixels encode their position (R = column, G = row,
B = image id), so crops, flips and record indices can be read back from the batch; video
frames encode their frame index and are stored losslessly (PNG, FFV1, rawvideo) or as
H.264 with B-frames and short GOPs (flat frames survive it to within a few levels), so
the decoded clip must hold consecutive indices however the decoder seeks.
"""
import threading
import time

import av
import numpy as np
import pytest
from PIL import Image

from diffjax.errors import InputError
from diffjax.input import pipeline, sources, transforms

NUM_IMAGES = 10


def position_image(h, w, ident):
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x % 256, y % 256, np.full_like(x, ident)], -1).astype(np.uint8)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """10 PNGs of different sizes, all larger than the 16 px crops used below."""
    root = tmp_path_factory.mktemp("images")
    (root / "sub").mkdir()
    for i in range(NUM_IMAGES):
        folder = root / "sub" if i % 3 == 0 else root  # recursive listing
        Image.fromarray(position_image(20 + i, 24 + 2 * i, 10 * i)).save(folder / f"im{i}.png")
    return root



def assert_batches_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


# ---------------------------------------------------------------------- determinism


def test_same_seed_same_batches_different_seed_differs(image_dir):
    kw = dict(crop=16, global_batch_size=4, shard_index=0, shard_count=1, with_metadata=True)
    a = pipeline.image_dataset(image_dir, seed=7, **kw)
    b = pipeline.image_dataset(image_dir, seed=7, **kw)  # rebuilt from scratch
    c = pipeline.image_dataset(image_dir, seed=8, **kw)
    for k in (0, 1, 2, 5):  # 5 is in the second/third epoch
        assert_batches_equal(a[k], b[k])
    first = [np.concatenate([ds[k]["image"].ravel() for k in range(3)]) for ds in (a, c)]
    assert not np.array_equal(*first)
    # the iterator (threads, prefetch) yields exactly the random-access batches
    it = pipeline.iterate(a, start=3, num_threads=2, prefetch_buffer_size=4)
    for k in range(3, 7):
        assert_batches_equal(next(it), a[k])


def test_each_epoch_is_reshuffled_and_covers_the_set(image_dir):
    ds = pipeline.image_dataset(image_dir, crop=16, global_batch_size=1, seed=0,
                                shard_index=0, shard_count=1, with_metadata=True)
    order = [int(ds[k]["index"][0]) for k in range(3 * NUM_IMAGES)]
    epochs = [order[e * NUM_IMAGES:(e + 1) * NUM_IMAGES] for e in range(3)]
    assert all(sorted(e) == list(range(NUM_IMAGES)) for e in epochs)
    assert epochs[0] != epochs[1] or epochs[1] != epochs[2]


def test_two_processes_get_disjoint_shards_covering_the_set(image_dir, monkeypatch):
    import jax

    seen = []
    for index in (0, 1):  # simulate process `index` of a 2-host job
        monkeypatch.setattr(jax, "process_index", lambda: index)
        monkeypatch.setattr(jax, "process_count", lambda: 2)
        assert pipeline.process_shard() == (index, 2)
        ds = pipeline.image_dataset(image_dir, crop=16, global_batch_size=2, seed=0,
                                    with_metadata=True)
        one_epoch = [int(i) for k in range(NUM_IMAGES // 2) for i in ds[k]["index"]]
        assert ds[0]["image"].shape == (1, 16, 16, 3)  # global batch 2 -> 1 per process
        assert len(set(one_epoch)) == NUM_IMAGES // 2
        seen.append(set(one_epoch))
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(range(NUM_IMAGES))


def test_shard_and_batch_errors(image_dir):
    with pytest.raises(InputError, match="outside"):
        pipeline.process_shard(2, 2)
    with pytest.raises(InputError, match="multiple"):
        pipeline.image_dataset(image_dir, crop=16, global_batch_size=3, seed=0,
                               shard_index=0, shard_count=2)
    with pytest.raises(InputError, match="fewer records"):
        pipeline.image_dataset(image_dir, crop=16, global_batch_size=16, seed=0,
                               shard_index=12, shard_count=16)
    with pytest.raises(InputError, match="does not exist"):
        pipeline.image_dataset(image_dir / "nope", crop=16, global_batch_size=1, seed=0)


# ---------------------------------------------------------------------- transforms


def test_crop_flip_and_float_range(image_dir):
    ds = pipeline.image_dataset(image_dir, crop=(12, 16), global_batch_size=NUM_IMAGES, seed=3,
                                shard_index=0, shard_count=1, with_metadata=True)
    flips = []
    for k in range(4):
        batch = ds[k]
        img = batch["image"]
        assert img.shape == (NUM_IMAGES, 12, 16, 3) and img.dtype == np.float32
        assert 0.0 <= img.min() and img.max() <= 1.0
        pix = np.round(img * 255).astype(int)
        np.testing.assert_allclose(img * 255, pix, atol=1e-4)  # exactly k / 255
        for j in range(NUM_IMAGES):
            top, left = batch["crop"][j]
            src = sources.load_image(ds_file(image_dir, int(batch["index"][j])))
            want = src[top:top + 12, left:left + 16]
            if batch["flipped"][j]:
                want = want[:, ::-1]
            np.testing.assert_array_equal(pix[j], want)
            flips.append(bool(batch["flipped"][j]))
    assert 0 < sum(flips) < len(flips)  # both flipped and unflipped crops occur

    plain = pipeline.image_dataset(image_dir, crop=16, global_batch_size=NUM_IMAGES, seed=3,
                                   flip=False, shard_index=0, shard_count=1, with_metadata=True)
    assert not any(plain[k]["flipped"].any() for k in range(4))


def ds_file(root, index):
    return sources.ImageFolderSource(root).files[index]


def test_to_float_maps_uint8_onto_unit_interval():
    x = transforms.to_float(np.arange(256, dtype=np.uint8))
    assert x.dtype == np.float32 and x[0] == 0.0 and x[-1] == 1.0
    np.testing.assert_allclose(x, np.arange(256) / 255.0, atol=1e-7)


@pytest.mark.parametrize("shape", [(10, 12), (8, 100), (100, 9), (16, 16), (1, 1)])
def test_images_smaller_than_the_crop_are_upscaled_not_padded(shape):
    """Any size works: a side smaller than the crop is resized up (aspect kept), so no
    padding border enters the training data; larger images are only cropped."""
    rng = np.random.default_rng(0)
    flat = np.full(shape + (3,), 77, np.uint8)
    out, (top, left) = transforms.random_crop(flat, 16, 16, rng)
    assert out.shape == (16, 16, 3)
    np.testing.assert_array_equal(out, 77)  # no black padding
    # a gradient image keeps its orientation (upscaled, not transposed or tiled)
    if min(shape) > 1:
        grad = position_image(*shape, 0)
        out, _ = transforms.random_crop(grad, 16, 16, rng)
        if shape[1] > 1:
            assert np.all(np.diff(out[..., 0].astype(int), axis=1) >= 0)
        assert np.all(np.diff(out[..., 1].astype(int), axis=0) >= 0)


def test_pipeline_mixes_small_large_grayscale_and_16bit_images(tmp_path):
    Image.fromarray(np.full((5, 7, 3), 200, np.uint8)).save(tmp_path / "a_tiny.png")
    Image.fromarray(np.full((30, 40), 60, np.uint8), mode="L").save(tmp_path / "b_gray.jpg")
    Image.fromarray(np.full((20, 20, 4), 90, np.uint8), mode="RGBA").save(tmp_path / "c_rgba.png")
    Image.fromarray(np.full((24, 24), 40 * 256 + 255, np.uint16)).save(tmp_path / "d_16bit.png")
    ds = pipeline.image_dataset(tmp_path, crop=16, global_batch_size=4, seed=0,
                                shard_index=0, shard_count=1, with_metadata=True)
    batch = ds[0]
    assert batch["image"].shape == (4, 16, 16, 3)
    means = dict(zip(batch["index"].tolist(), np.round(batch["image"].mean((1, 2, 3)) * 255)))
    assert means == {0: 200, 1: pytest.approx(60, abs=2), 2: 90, 3: 40}  # 16-bit: high byte


def test_unreadable_image_is_a_clear_error(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match="cannot read .* as an image"):
        sources.ImageFolderSource(tmp_path)[0]


# ---------------------------------------------------------------------- video

T, VH, VW = 4, 24, 32


def index_frame(i):
    """A flat frame encoding frame index ``i`` (R = 8 i, G = 255 - 8 i)."""
    frame = np.empty((VH, VW, 3), np.uint8)
    frame[..., 0], frame[..., 1], frame[..., 2] = 8 * i, 255 - 8 * i, 128
    return frame


def decoded_indices(clip):
    """Frame indices from ``[T, H, W, 3]`` in [0, 1] or uint8 (robust to lossy coding)."""
    clip = np.asarray(clip, np.float64)
    if clip.max() <= 1.0:
        clip = clip * 255
    return np.round(clip[..., 0].mean(axis=(-1, -2)) / 8).astype(int).tolist()


def write_video(path, codec, n, pix_fmt, options=None):
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=25)
        stream.width, stream.height, stream.pix_fmt = VW, VH, pix_fmt
        if options:
            stream.options = options
        for i in range(n):
            for packet in stream.encode(av.VideoFrame.from_ndarray(index_frame(i), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    write_video(root / "a_ffv1.mkv", "ffv1", 20, "bgr0")               # lossless, intra
    write_video(root / "b_raw.avi", "rawvideo", 12, "bgr24")          # lossless, intra
    write_video(root / "c_h264.mp4", "libx264", 30, "yuv420p",        # GOP 6, 2 B-frames
                {"g": "6", "bf": "2", "crf": "0"})
    write_video(root / "d_short.mkv", "ffv1", T - 1, "bgr0")          # too short: skipped
    return root


@pytest.fixture(scope="module")
def frame_dir(tmp_path_factory):
    """Two sequences of PNG frames, file names not zero padded (f2 before f10)."""
    root = tmp_path_factory.mktemp("frames")
    for seq, n in (("seq_a", 12), ("seq_b", 7)):
        (root / seq).mkdir()
        for i in range(n):
            Image.fromarray(index_frame(i)).save(root / seq / f"f{i + 1}.png")
    return root


def test_video_file_source_reads_exact_clips_at_any_start(video_dir):
    src = sources.VideoFileSource(video_dir, min_frames=T)
    assert [p.name for p in src.paths] == ["a_ffv1.mkv", "b_raw.avi", "c_h264.mp4"]
    assert [src.num_frames(i) for i in range(len(src))] == [20, 12, 30]
    for i in range(len(src)):
        n = src.num_frames(i)
        for start in sorted({0, 1, 5, 7, n // 2, n - T}):
            clip = src.read_clip(i, start, T)
            assert clip.shape == (T, VH, VW, 3) and clip.dtype == np.uint8
            assert decoded_indices(clip) == list(range(start, start + T)), (src.paths[i], start)
        with pytest.raises(InputError, match="outside"):
            src.read_clip(i, n - T + 1, T)


def test_h264_clips_come_from_seeking_not_the_fallback(video_dir, monkeypatch):
    """Seeking to the keyframe before the clip is exact on a GOP-6 B-frame stream."""
    def no_fallback(*args):
        raise AssertionError("fell back to decoding from the start")

    monkeypatch.setattr(sources, "_decode_sequential", no_fallback)
    src = sources.VideoFileSource(video_dir / "c_h264.mp4")
    for start in (7, 13, 26):
        assert decoded_indices(src.read_clip(0, start, T)) == list(range(start, start + T))


@pytest.mark.parametrize("kind", ["files", "frames"])
def test_video_dataset_clips_have_shape_and_frame_order(kind, video_dir, frame_dir):
    root = video_dir if kind == "files" else frame_dir
    ds = pipeline.video_dataset(root, num_frames=T, crop=16, global_batch_size=2, seed=1,
                                shard_index=0, shard_count=1, with_metadata=True)
    again = pipeline.video_dataset(root, num_frames=T, crop=16, global_batch_size=2, seed=1,
                                   shard_index=0, shard_count=1, with_metadata=True)
    starts = set()
    for k in range(3):
        batch = ds[k]
        video = batch["video"]
        assert video.shape == (2, T, 16, 16, 3) and video.dtype == np.float32
        assert 0.0 <= video.min() and video.max() <= 1.0
        for b in range(2):
            first = int(batch["frame_index"][b][0])
            np.testing.assert_array_equal(batch["frame_index"][b], np.arange(first, first + T))
            assert decoded_indices(video[b]) == list(range(first, first + T))
            starts.add(first)
        assert_batches_equal(batch, again[k])
    assert len(starts) > 1  # random clip starts


def test_video_dataset_auto_kind_and_real_data(shared_data):
    clips = pipeline.video_dataset(shared_data / "video_clips", num_frames=3, crop=32,
                                   global_batch_size=2, seed=0, shard_index=0, shard_count=1)
    assert clips[0]["video"].shape == (2, 3, 32, 32, 3)  # files (mp4 + raw yuv)
    frames = pipeline.video_dataset(shared_data / "basketballpass", num_frames=3, crop=(32, 48),
                                    global_batch_size=1, seed=0, shard_index=0, shard_count=1,
                                    with_metadata=True)
    batch = frames[0]
    assert batch["video"].shape == (1, 3, 32, 48, 3)
    first = int(batch["frame_index"][0, 0])
    src = sources.FrameFolderSource(shared_data / "basketballpass")
    want = src.read_clip(0, first, 3)
    top, left = batch["crop"][0]
    want = want[:, top:top + 32, left:left + 48]
    if batch["flipped"][0]:
        want = want[:, :, ::-1]
    np.testing.assert_array_equal(np.round(batch["video"][0] * 255).astype(np.uint8), want)


def test_video_smaller_than_crop_is_upscaled(frame_dir):
    ds = pipeline.video_dataset(frame_dir, num_frames=T, crop=40, global_batch_size=1, seed=0,
                                shard_index=0, shard_count=1, with_metadata=True)
    batch = ds[0]
    assert batch["video"].shape == (1, T, 40, 40, 3)
    first = int(batch["frame_index"][0, 0])
    assert decoded_indices(batch["video"][0]) == list(range(first, first + T))


def test_video_errors(video_dir, frame_dir):
    with pytest.raises(InputError, match="at least 40 frames"):
        sources.VideoFileSource(video_dir, min_frames=40)
    with pytest.raises(InputError, match="at least 40 frames"):
        sources.FrameFolderSource(frame_dir, min_frames=40)
    with pytest.raises(InputError, match="video kind"):
        pipeline.video_dataset(frame_dir, num_frames=T, crop=16, global_batch_size=1, seed=0,
                               kind="gif", shard_index=0, shard_count=1)


# ---------------------------------------------------------------------- prefetch


def prefetch_threads():
    return [t for t in threading.enumerate() if t.name == "diffjax-prefetch"]


def wait_for_no_prefetch_thread(timeout=5.0):
    deadline = time.time() + timeout
    while prefetch_threads() and time.time() < deadline:
        time.sleep(0.02)
    return not prefetch_threads()


def test_prefetch_to_device_keeps_order_and_applies_put(image_dir):
    ds = pipeline.image_dataset(image_dir, crop=16, global_batch_size=2, seed=0,
                                shard_index=0, shard_count=1)
    calls = []

    def put(batch):
        calls.append(threading.current_thread().name)
        return {k: v * 2 for k, v in batch.items()}

    it = pipeline.prefetch_to_device(pipeline.iterate(ds, start=1, num_threads=2), put, size=2)
    for k in range(1, 5):
        np.testing.assert_array_equal(next(it)["image"], ds[k]["image"] * 2)
    assert set(calls) == {"diffjax-prefetch"}  # put runs ahead, in the thread
    it.close()  # consumer stops early (end of training): the thread must not hang
    assert wait_for_no_prefetch_thread()


def test_prefetch_to_device_reraises_and_finishes():
    def put(x):
        if x == 3:
            raise RuntimeError("bad batch 3")
        return x

    it = pipeline.prefetch_to_device(iter(range(6)), put, size=1)
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(RuntimeError, match="bad batch 3"):
        next(it)
    assert list(pipeline.prefetch_to_device(iter(range(5)), lambda x: x + 1)) == [1, 2, 3, 4, 5]
    assert wait_for_no_prefetch_thread()


def test_dataset_from_config(image_dir, frame_dir):
    images = pipeline.dataset_from_config({"kind": "images", "path": str(image_dir), "crop": 16},
                                          global_batch_size=2, seed=0, shard_index=0,
                                          shard_count=1)
    assert images[0]["image"].shape == (2, 16, 16, 3)
    video = pipeline.dataset_from_config(
        {"kind": "video", "path": str(frame_dir), "crop": [16, 20], "num_frames": T},
        global_batch_size=2, seed=0, shard_index=0, shard_count=1)
    assert video[0]["video"].shape == (2, T, 16, 20, 3)
    with pytest.raises(InputError, match="unknown data kind"):
        pipeline.dataset_from_config({"kind": "audio"}, global_batch_size=1, seed=0)
