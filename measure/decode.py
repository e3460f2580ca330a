"""Decoding speed: our sequential PyAV sampler against seeking once per sampled second and against
decord, on generated test clips; and whether the data loader keeps up with a GPU at real size.

    decode_figures(clip_dir)    frames/s of each reader on a short and a long clip (the same frames)
    decode_memory_figures(clip_dir)   the peak memory of a decode against its output (long, extreme aspect)
    loader_figures(clip_dir)    one E.T.Instruct-like clip's decode time against the projected
                                training step per sample of d2vlm-3.8b; DataLoader workers per GPU
"""
from __future__ import annotations

import math
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import torch

import model
import train
import video
from config import PRESETS
from measure import REPO

# E.T.Instruct-164K: samples, mean video length, LLM tokens of a sample (video tokens included,
# docs/design.md#training-recipe), and the videos as the dataset ships them (3 fps, 224-px short side; 16:9 assumed)
ETINSTRUCT = {"samples": 164_000, "video_s": 146.0, "llm_tokens": 300, "fps": 3, "width": 398, "height": 224}
QFORMER_TEXT = 64   # BERT tokens of a question, about (a small share of the Q-Former's work)
LOADER = {"mfu": 0.5, "ahead": 2.0}  # the GPU's assumed MFU; how far ahead of it the loader must be


def timed(fn, repeat, sync=lambda: None):
    """Mean seconds of fn() over `repeat` calls after one warm-up call."""
    fn()
    sync()
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync()
    return (time.perf_counter() - t) / repeat


def sample_frames_seek(path, fps: float = 1.0, size: int = 224) -> torch.Tensor:
    """The usual alternative to video.sample_frames: one seek per sampled time k/fps (to the keyframe
    before it), then decode forward to the frame nearest to k/fps. The same frames, other cost."""
    out = []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        t0 = float((stream.start_time or 0) * stream.time_base)
        k = 0
        while True:
            target = k / fps
            container.seek(int((target + t0) / stream.time_base), stream=stream)
            prev, prev_t, pick = None, 0.0, None
            for frame in container.decode(stream):
                if frame.pts is None:
                    continue
                t = frame.time - t0
                if t >= target:
                    pick = prev if prev is not None and target - prev_t <= t - target else frame
                    break
                prev, prev_t = frame, t
            if pick is None:  # past the last frame
                break
            out.append(video.resize_crop(pick, size))
            k += 1
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


def sample_frames_decord(path, fps: float = 1.0, size: int = 224) -> torch.Tensor:
    """decord's reader (resizing inside the decoder), the frame nearest to each k/fps, centre crop."""
    import decord
    probe = decord.VideoReader(str(path))
    h, w = probe[0].shape[:2]
    scale = size / min(w, h)
    vr = decord.VideoReader(str(path), width=max(size, round(w * scale)), height=max(size, round(h * scale)))
    times = vr.get_frame_timestamp(range(len(vr)))[:, 0]
    idx = [int(np.argmin(np.abs(times - k / fps))) for k in range(int(times[-1] * fps + 1e-9) + 1)]
    img = vr.get_batch(idx).asnumpy()
    top, left = (img.shape[1] - size) // 2, (img.shape[2] - size) // 2
    return torch.from_numpy(img[:, top:top + size, left:left + size]).permute(0, 3, 1, 2).contiguous()


def make_clip(path, seconds: int, width: int, height: int, fps: int) -> Path:
    """A moving-pattern test clip (x264, the encoder's default keyframe interval), written once."""
    path = Path(path)
    if not path.is_file():
        yy, xx = np.mgrid[0:height, 0:width]
        def frames():
            for i in range(seconds * fps):
                img = np.empty((height, width, 3), np.uint8)
                img[..., 0] = (xx + 3 * i) % 256
                img[..., 1] = (yy + 2 * i) % 256
                img[..., 2] = ((xx + yy) // 4 + i) % 256
                yield img
        path.parent.mkdir(parents=True, exist_ok=True)
        video.write_video(path, frames(), fps)
    return path


def decode_figures(clip_dir, size=224, repeat=2):
    """Frames/s of the sequential sampler (ours), seek-per-sample and decord on the same clips."""
    clips = {"short clip (20 s, 320x240, 25 fps)": make_clip(Path(clip_dir) / "short.mp4", 20, 320, 240, 25),
             "long clip (120 s, 640x360, 30 fps)": make_clip(Path(clip_dir) / "long.mp4", 120, 640, 360, 30)}
    try:
        import decord  # noqa: F401
        readers = {"decord": sample_frames_decord}
    except ImportError:
        readers = {}
    rows = []
    for name, clip in clips.items():
        ref = video.sample_frames(clip, 1.0, size)
        t_seq = timed(lambda: video.sample_frames(clip, 1.0, size), repeat)
        rows.append(("frame sampling", f"{name}: PyAV sequential (ours)", len(ref) / t_seq, "frames/s", None))
        same = torch.equal(sample_frames_seek(clip, 1.0, size), ref)
        t_seek = timed(lambda: sample_frames_seek(clip, 1.0, size), repeat)
        rows.append(("frame sampling", f"{name}: PyAV seek per sample ({'same' if same else 'OTHER'} frames)",
                     len(ref) / t_seek, "frames/s", None))
        rows.append(("frame sampling", f"{name}: sequential / seek", t_seek / t_seq, "x", None))
        for rname, fn in readers.items():
            t = timed(lambda: fn(clip, 1.0, size), repeat)
            rows.append(("frame sampling", f"{name}: {rname}", len(ref) / t, "frames/s", None))
            rows.append(("frame sampling", f"{name}: sequential / {rname}", t / t_seq, "x", None))
    if not readers:
        rows.append(("frame sampling", "decord: not installed (pip install decord to compare)", math.nan, "", None))
    return rows


# the peak memory of one decode, measured in a process of its own (Linux): after a warm-up decode
# (libraries and decoder loaded) the high-water mark of its resident memory is reset (clear_refs 5),
# then the decode's high-water mark over the resident memory before it, against the frames it returns
_PEAK = """import re, sys
sys.path.insert(0, {repo!r})
import video
def kb(field):
    return int(re.search(field + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))
video.sample_frames({clip!r}, 1.0, 16)
open("/proc/self/clear_refs", "w").write("5")
base = kb("VmRSS")
frames = video.sample_frames({clip!r}, 1.0, {size})
print((kb("VmHWM") - base) * 1024, frames.numel())"""


def decode_memory(clip, size=224) -> tuple:
    """(bytes the decode of `clip` raised its process's peak memory by, bytes of the frames it returned)."""
    code = _PEAK.format(repo=str(REPO), clip=str(clip), size=size)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    return int(out[-2]), int(out[-1])


def decode_memory_figures(clip_dir, size=224):
    """The peak memory of a decode against its output, on a long clip and an extreme-aspect one."""
    clips = {"600-s clip, 64x48, 600 frames": make_clip(Path(clip_dir) / "long_600s.mp4", 600, 64, 48, 2),
             "30-s clip of 16x2000 (extreme aspect), 30 frames": make_clip(Path(clip_dir) / "tall.mp4", 30, 16, 2000, 5)}
    rows = []
    for name, clip in clips.items():
        peak, out = decode_memory(clip, size)
        rows.append(("decode memory", f"{name} at {size} px: peak memory of the decode / its output ({out / 2**20:.0f} MB)",
                     peak / out, "x", ("<=", 1.5)))
    return rows


def loader_figures(clip_dir, preset="d2vlm-3.8b", gpu="H100", repeat=2):
    """Will the data loader keep up at real size? Decode + sample one E.T.Instruct-like clip on one
    worker (this process), against the projected training step per sample of one GPU at
    LOADER["mfu"] (train.train_flops of `preset`, built on the meta device); the DataLoader workers
    per GPU that keep the loader LOADER["ahead"] times ahead of it."""
    cfg = PRESETS[preset]
    e = ETINSTRUCT
    clip = make_clip(Path(clip_dir) / "etinstruct_like.mp4", int(e["video_s"]), e["width"], e["height"], e["fps"])
    t_decode = timed(lambda: video.sample_frames(clip, cfg.fps, cfg.image_size), repeat)
    with torch.device("meta"):
        m = model.build_model(cfg)
    frames = int(e["video_s"] * cfg.fps)
    flops = train.train_flops(m, e["llm_tokens"], frames, frames * (cfg.num_query_tokens + QFORMER_TEXT))
    t_step = flops / (LOADER["mfu"] * train.PEAK_TFLOPS[gpu] * 1e12)
    g = (f"data loading at real size: {int(e['video_s'])}-s clip, {e['fps']} fps, {e['width']}x{e['height']} "
         f"-> {frames} frames of {cfg.image_size} px")
    return [(g, "decode + sample one clip, one worker", t_decode, "s", None),
            (g, f"projected training step per sample, one {gpu} at {LOADER['mfu']:.0%} MFU "
                f"({flops / 1e12:.0f} TFLOP)", t_step, "s", None),
            (g, f"DataLoader workers per GPU to stay {LOADER['ahead']:g}x ahead",
             math.ceil(LOADER["ahead"] * t_decode / t_step), "workers", None)]
