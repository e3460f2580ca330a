"""video.py: the frame sampler against clips whose frames carry their own index, resizing and
cropping, CLIP normalisation, writing mp4 files, and unreadable files."""
import math
import struct

import av
import numpy as np
import pytest
import torch

import video
import video_zoo


LEVELS = (0, 85, 170, 255)


def index_clip(path, n, fps, w=160, h=120):
    """A clip whose frame i shows i in base 4 as three grey bands (readable after resize and crop)."""
    frames = np.zeros((n, h, w, 3), np.uint8)
    for i in range(n):
        for b in range(3):
            frames[i, b * h // 3:(b + 1) * h // 3] = LEVELS[(i // 4 ** b) % 4]
    video.write_video(path, iter(frames), fps)  # any iterable of frames


def read_index(frame):
    """Inverse of index_clip for a (3, S, S) uint8 frame."""
    s = frame.shape[1]
    digits = [int(np.argmin([abs(float(frame[:, b * s // 3 + s // 12:(b + 1) * s // 3 - s // 12].float().mean()) - v)
                             for v in LEVELS])) for b in range(3)]
    return sum(d * 4 ** b for b, d in enumerate(digits))


@pytest.mark.parametrize("video_fps,fps", [(7, 1.0), (7, 0.5), (7, 3.0), (3, 1.0), (2, 4.0)])
def test_sampler_takes_the_nearest_frame(tmp_path, video_fps, fps):
    n = 60
    index_clip(tmp_path / "c.mp4", n, video_fps)
    frames = video.sample_frames(tmp_path / "c.mp4", fps=fps, size=48)
    last = (n - 1) / video_fps
    expect = []
    for k in range(int(last * fps + 1e-9) + 1):
        t = k / fps
        d = [abs(i / video_fps - t) for i in range(n)]
        expect.append(min(range(n), key=lambda i: (d[i], i)))  # nearest, ties to the earlier frame
    assert frames.shape == (len(expect), 3, 48, 48) and frames.dtype == torch.uint8
    assert [read_index(f) for f in frames] == expect


def test_frame_cache_decodes_each_file_once_and_sees_changes(tmp_path, monkeypatch):
    index_clip(tmp_path / "a.mp4", 12, 4)  # 3 frames at 1 fps
    index_clip(tmp_path / "b.mp4", 20, 4)  # 5 frames
    decoded, real = [], video.sample_frames
    monkeypatch.setattr(video, "sample_frames", lambda p, *a, **k: decoded.append(p.name) or real(p, *a, **k))
    one = real(tmp_path / "a.mp4", 1.0, 48).numel()  # bytes (uint8) of a.mp4's 3 frames
    cache = video.FrameCache(max_bytes=2 * one)
    first = cache(tmp_path / "a.mp4", 1.0, 48)
    assert torch.equal(first, real(tmp_path / "a.mp4", 1.0, 48)) and first.dtype == torch.uint8
    assert cache(tmp_path / "a.mp4", 1.0, 48) is first
    for m in (1, 2, 3, 10):  # a prefix of the whole decode: served from it, as sample_frames would cut it
        assert torch.equal(cache(tmp_path / "a.mp4", 1.0, 48, max_frames=m), real(tmp_path / "a.mp4", 1.0, 48, max_frames=m))
    assert decoded == ["a.mp4"] and (cache.hits, cache.misses) == (5, 1)
    # a decode cut at max_frames serves shorter prefixes only; a longer or whole one decodes again
    calls = [(2, True), (1, False), (4, True), (None, True), (3, False), (None, False)]
    for m, again in calls:
        n = len(decoded)
        assert torch.equal(cache(tmp_path / "b.mp4", 1.0, 48, max_frames=m), real(tmp_path / "b.mp4", 1.0, 48, max_frames=m))
        assert (len(decoded) == n + 1) == again, (m, again)
    # b's 5 frames and a's 3 exceed 6: a, the least recently used, went
    assert [k[0] for k in cache.kept] == [str(tmp_path / "b.mp4")] and cache.used == 5 * one // 3
    index_clip(tmp_path / "b.mp4", 8, 4)  # rewritten: another size and time, decoded afresh
    assert cache(tmp_path / "b.mp4", 1.0, 48).shape[0] == 2 and decoded[-1] == "b.mp4" and cache.used == 2 * one // 3
    (tmp_path / "b.mp4").write_text("not a video any more")
    with pytest.raises(ValueError, match="b.mp4"):
        cache(tmp_path / "b.mp4", 1.0, 48)
    big = video.FrameCache(max_bytes=one - 1)  # a video larger than the cache is returned, not kept
    assert torch.equal(big(tmp_path / "a.mp4", 1.0, 48), real(tmp_path / "a.mp4", 1.0, 48)) and not big.kept


def test_write_video_needs_frames(tmp_path):
    with pytest.raises(ValueError, match="e.mp4: no frames"):
        video.write_video(tmp_path / "e.mp4", iter([]), 4)
    assert not list(tmp_path.iterdir())


def test_sampler_resizes_short_side_and_centre_crops(tmp_path):
    # 200x100: left half red, right half blue, a green 20-px stripe at the centre
    img = np.zeros((100, 200, 3), np.uint8)
    img[:, :100] = (255, 0, 0)
    img[:, 100:] = (0, 0, 255)
    img[:, 90:110] = (0, 255, 0)
    video.write_video(tmp_path / "w.mp4", np.repeat(img[None], 4, 0), 2)
    f = video.sample_frames(tmp_path / "w.mp4", size=50)[0].permute(1, 2, 0).numpy().astype(int)
    # resized to 100x50, the crop keeps columns 25..75: red 0..20, green 20..30, blue 30..50
    assert f.shape == (50, 50, 3)
    assert (f[25, 5] - (255, 0, 0)).__abs__().max() < 40
    assert (f[25, 25] - (0, 255, 0)).__abs__().max() < 40
    assert (f[25, 45] - (0, 0, 255)).__abs__().max() < 40
    assert video.sample_frames(tmp_path / "w.mp4", size=50, max_frames=1).shape[0] == 1


def test_normalize_is_clip():
    x = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    y = video.normalize(x)
    assert y.dtype == torch.float32
    for c in range(3):
        assert torch.allclose(y[:, c], torch.tensor((1 - video.CLIP_MEAN[c]) / video.CLIP_STD[c]))


def _faststart(path, n=12):
    frames = np.random.default_rng(0).integers(0, 255, (n, 64, 96, 3), dtype=np.uint8)
    with av.open(str(path), "w", options={"movflags": "faststart"}) as c:
        s = c.add_stream("libx264", rate=4)
        s.width, s.height, s.pix_fmt = 96, 64, "yuv420p"
        for img in frames:
            c.mux(s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        c.mux(s.encode())
    return path.read_bytes()


def test_sampler_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.mp4: video file not found"):
        video.sample_frames(tmp_path / "nope.mp4")
    (tmp_path / "junk.mp4").write_bytes(b"\x00not a video" * 50)
    with pytest.raises(ValueError, match="junk.mp4: cannot open as a video"):
        video.sample_frames(tmp_path / "junk.mp4")
    with av.open(str(tmp_path / "audio.m4a"), "w") as c:  # audio only
        s = c.add_stream("aac", rate=16000)
        fr = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        fr.sample_rate = 16000
        c.mux(s.encode(fr))
        c.mux(s.encode())
    with pytest.raises(ValueError, match="audio.m4a: has no video stream"):
        video.sample_frames(tmp_path / "audio.m4a")
    full = _faststart(tmp_path / "full.mp4", n=40)
    i = 0  # cut right before the media data: a header with no frames
    while full[i + 4:i + 8] != b"mdat":
        i += struct.unpack(">I", full[i:i + 4])[0]
    (tmp_path / "zero.mp4").write_bytes(full[:i])
    with pytest.raises(ValueError, match="zero.mp4: no decodable video frames"):
        video.sample_frames(tmp_path / "zero.mp4")
    (tmp_path / "half.mp4").write_bytes(full[:len(full) // 2])
    with pytest.raises(ValueError, match=r"half.mp4: its frames end at [0-9.]+ s, its video track declares 10.0 s"):
        video.sample_frames(tmp_path / "half.mp4")
    mid = bytearray(full)
    mid[len(full) // 2:len(full) // 2 + 4000] = bytes(4000)
    (tmp_path / "mid.mp4").write_bytes(bytes(mid))
    with pytest.raises(ValueError, match="mid.mp4: (corrupt|truncated) video"):
        video.sample_frames(tmp_path / "mid.mp4")


# ---------------------------------------------------------------------------------------------
# Real files as users have them (tests/video_zoo.py)

@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return video_zoo.collection(tmp_path_factory.mktemp("zoo"))


def expected_samples(shown, fps=1.0):
    """The frame index each sample k should show: the shown frame nearest k / fps (ties: earlier)."""
    idx = [i for i, t in enumerate(shown) if t is not None]
    last = max(shown[i] for i in idx)
    return [min(idx, key=lambda i: (abs(shown[i] - k / fps), shown[i], i)) for k in range(int(last * fps + 1e-9) + 1)]


def test_every_file_reads_the_frames_a_player_shows_or_fails_in_one_line(zoo):
    for path, what, shown, error in zoo:
        if error:
            with pytest.raises(ValueError, match=rf"^{path}: .*{error}") as e:
                video.probe(path)
                video.sample_frames(path, 1.0, 32)
            assert "\n" not in str(e.value), what
            continue
        info = video.probe(path)
        frames = video.sample_frames(path, 1.0, 32)
        want = expected_samples(shown)
        assert [video_zoo.read_index(f) for f in frames] == want, what
        assert info["end"] == pytest.approx(max(t for t in shown if t is not None), abs=1e-3), what
        assert len(frames) == math.floor(info["end"] + 1e-9) + 1, what  # the probe and the sampler agree
        half = video.sample_frames(path, 1.0, 32, max_frames=2)
        assert torch.equal(half, frames[:2]), what


def test_the_main_stream_and_the_tracks_own_length_are_read(zoo):
    files = {p.name: p for p, *_ in zoo}
    assert video.probe(files["long_audio.mkv"])["declared"] == pytest.approx(4.0)  # not the audio's 9 s
    assert video.probe(files["offset.mkv"])["declared"] == pytest.approx(4.0)  # its track ends at 14 s, starts at 10
    assert video.probe(files["raw.h264"])["declared"] is None  # a raw stream declares no length


def test_a_rotated_clip_is_turned_upright_only_when_asked(zoo):
    path = next(p for p, *_ in zoo if p.name == "rotated.mp4")
    stored = video.sample_frames(path, 1.0, 32)
    upright = video.sample_frames(path, 1.0, 32, upright=True)
    assert [video_zoo.read_index(f) for f in stored] == [0, 10, 20, 30]  # as stored, as the release reads it
    assert torch.equal(upright, torch.rot90(stored, -1, dims=(2, 3)))  # 90 degrees clockwise, as a player shows it


def test_an_extreme_aspect_ratio_is_cropped_before_it_is_scaled(tmp_path):
    path = video_zoo.write(tmp_path / "x.mkv", [i / 10 for i in range(20)], codec="ffv1", size=(2, 16000),
                           pix_fmt="yuv444p")
    assert video.probe(path)["end"] == pytest.approx(1.9)
    frames = video.sample_frames(path, 1.0, 32)  # scaled whole, the picture would be 32 x 256,000
    assert frames.shape == (2, 3, 32, 32)
    assert frames.untyped_storage().nbytes() == frames.numel()  # one tensor, no more than the frames
