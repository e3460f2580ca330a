"""Frames: PyAV decoding at 1 fps and CLIP normalisation; writing mp4 files.

Paper: "Experiments / implementation details" (frames sampled at 1 fps, 224 px). DESIGN.md §2.

    sample_frames(path, fps, size)   one sequential decode; frame k = the decoded frame nearest to t = k / fps
    FrameCache(max_bytes)            sample_frames, each file decoded once while it fits (a video serves many records)
    probe(path), probe_all(paths)    the pre-flight check: opens, decodes first and last frame, not truncated
    normalize(frames)                uint8 -> float32 with CLIP's mean and std
    write_video(path, frames, fps)   RGB frames -> H.264 mp4 (temporary name, then renamed)
"""
from __future__ import annotations

import itertools
import json
import os
import sys
from collections import OrderedDict
from pathlib import Path

import av
import numpy as np
import torch

from support.files import atomic_path, is_number, read_json

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TAIL = 3.0              # seconds before the declared end where probe() starts decoding
TRUNCATION_SLACK = 1.0  # seconds of declared duration a video may lack before it counts as truncated
CACHE_ENV = "D2VLM_CACHE"  # the folder of probe_all's cache (default ~/.cache/d2vlm)
# FFmpeg's demuxers of single pictures (the *_pipe ones too: png_pipe, jpeg_pipe, ...): a PNG renamed .mp4
# opens as a 1-frame "video", and is refused as the picture it is
STILL_IMAGE_FORMATS = ("image2", "image2pipe")
PROGRESS_DELAY = 2.0  # seconds before the check's progress bar shows: a quick check prints nothing

def _open(path: Path):
    """(the open container, its first video stream), or one error naming the file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: video file not found")
    try:
        container = av.open(str(path))
    except (av.FFmpegError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot open as a video ({e})") from None
    if not container.streams.video:
        container.close()
        raise ValueError(f"{path}: has no video stream (audio-only or not a video)")
    if container.format.name in STILL_IMAGE_FORMATS or container.format.name.endswith("_pipe"):
        name = container.format.name
        container.close()
        raise ValueError(f"{path}: a still image ({name}), not a video")
    return container, container.streams.video[0]


def sample_frames(path, fps: float = 1.0, size: int = 224, max_frames: int | None = None) -> torch.Tensor:
    """Decode `path` once, front to back, and keep for every k with k/fps <= (time of the last frame)
    the frame nearest to t = k/fps (ties go to the earlier frame). Each kept frame is resized so its
    short side is `size` (bicubic) and centre-cropped. Returns uint8 (T, 3, size, size). With
    `max_frames`, decoding stops after that many frames (the first max_frames/fps seconds).
    Missing, unreadable, audio-only or frameless files raise an error naming the file."""
    path = Path(path)
    container, stream = _open(path)
    out = []
    with container:
        stream.thread_type = "AUTO"
        t0 = float((stream.start_time or 0) * stream.time_base)
        k, prev, prev_t, picked, decoded = 0, None, 0.0, {}, 0
        try:
            for frame in container.decode(stream):
                if frame.pts is None:
                    continue
                decoded += 1
                t = frame.time - t0
                while t >= k / fps and (max_frames is None or len(out) < max_frames):
                    pick = prev if prev is not None and k / fps - prev_t <= t - k / fps else frame
                    if id(pick) not in picked:  # a frame may serve several k when fps > video rate
                        picked = {id(pick): resize_crop(pick, size)}
                    out.append(picked[id(pick)])
                    k += 1
                if max_frames is not None and len(out) >= max_frames:
                    break
                prev, prev_t = frame, t
        except av.FFmpegError as e:
            raise ValueError(f"{path}: corrupt video, decoding failed after {len(out)} frames ({e})") from None
        declared, rate = stream.frames, float(stream.average_rate or 0)
    if not out:
        raise ValueError(f"{path}: no decodable video frames")
    if max_frames is None and declared and declared - decoded > max(rate, 1):  # > 1 s of frames missing
        raise ValueError(f"{path}: truncated video, decoded {decoded} of the {declared} frames its header declares")
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


class FrameCache:
    """sample_frames with the results kept, least recently used dropped first, up to max_bytes
    (uint8 frames: 224 px is 150 KB a frame). A file is kept once per (fps, size), keyed with its size
    and modification time, so a file changed on disk is decoded again. A kept decode serves every
    call whose answer is a prefix of it (max_frames cuts a decode to its first frames): records that
    ask for different max_frames share one decode. The returned tensor is shared with the cache:
    read it, do not write into it. Errors are not kept (the next call decodes again)."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.used, self.kept = max_bytes, 0, OrderedDict()  # key -> (frames, max_frames it had)
        self.hits = self.misses = 0

    def __call__(self, path, fps: float = 1.0, size: int = 224, max_frames: int | None = None) -> torch.Tensor:
        path = Path(path)
        st = path.stat() if path.is_file() else None
        key = (str(path), fps, size, st and st.st_size, st and st.st_mtime_ns)
        if key in self.kept:
            frames, limit = self.kept[key]
            # a whole decode (limit None: also checked for truncation) serves any call; one that ended before
            # its limit holds every frame too; one cut at its limit serves max_frames up to it
            if limit is None or (max_frames is not None and (len(frames) < limit or max_frames <= limit)):
                self.hits += 1
                self.kept.move_to_end(key)
                return frames if max_frames is None else frames[:max_frames]
            self._drop(key)
        self.misses += 1
        frames = sample_frames(path, fps, size, max_frames)
        n = frames.numel() * frames.element_size()
        if n <= self.max_bytes:
            while self.used + n > self.max_bytes:
                self._drop(next(iter(self.kept)))
            self.kept[key], self.used = (frames, max_frames), self.used + n
        return frames

    def _drop(self, key) -> None:
        frames, _ = self.kept.pop(key)
        self.used -= frames.numel() * frames.element_size()


def probe(path) -> dict:
    """Check that `path` is a whole, decodable video without decoding all of it: open it, find its
    video stream, decode the first frame, seek near the end and decode to the last frame. Returns
    {"end": time of the last decodable frame (s, from the first), "declared": the duration its
    header declares (s, or None)}. Raises ValueError naming the file when it cannot be opened, has
    no video stream or no frame, fails to decode, or decodes to more than TRUNCATION_SLACK seconds
    short of its declared duration (a truncated file)."""
    path = Path(path)
    container, stream = _open(path)
    with container:
        tb = stream.time_base
        declared = (float(stream.duration * tb) if stream.duration else
                    float(container.duration / av.time_base) if container.duration else None)
        try:
            frames = container.decode(stream)
            first = next((f for f in frames if f.pts is not None), None)
            if first is None:
                raise ValueError(f"{path}: no decodable video frames")
            t0, end = first.time, first.time
            if declared is not None and declared > TAIL:  # on to the last seconds
                container.seek(int((float(first.time) + declared - TAIL) / tb), stream=stream, backward=True)
                frames = container.decode(stream)
            for frame in frames:  # a short video goes on with the same decoder (a new one would read "End of file")
                if frame.pts is not None:
                    end = max(end, frame.time)
        except av.FFmpegError as e:
            raise ValueError(f"{path}: corrupt video, decoding failed ({e})") from None
    end -= t0
    rate = float(stream.average_rate or 0)
    if declared is not None and declared - end > TRUNCATION_SLACK + (1 / rate if rate else 0):
        raise ValueError(f"{path}: truncated video, its frames end at {end:.1f} s of the {declared:.1f} s its header declares")
    return {"end": end, "declared": declared}


def probe_all(paths, workers: int | None = None, progress: bool = True) -> dict:
    """probe() every file, in parallel threads (decoding releases the GIL), cached by path + size +
    modification time in CACHE_ENV's folder (default ~/.cache/d2vlm) so that a second run is instant.
    Returns {path: probe's dict, or the error message (str) for a file that fails}."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm
    cache_file = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "d2vlm") / "probe.json"
    cache = _read_cache(cache_file)

    def key(p):
        st = Path(p).stat()
        return f"{Path(p).resolve()}|{st.st_size}|{st.st_mtime_ns}"

    def one(p):
        try:
            k = key(p)
            if k not in cache:
                cache[k] = probe(p)
            return p, cache[k]
        except (ValueError, OSError) as e:
            return p, str(e)
    paths = list(dict.fromkeys(paths))
    todo = sum(1 for p in paths if Path(p).is_file() and key(p) not in cache)
    with ThreadPoolExecutor(workers or min(8, os.cpu_count() or 1)) as pool:
        out = dict(tqdm(pool.map(one, paths), total=len(paths), desc="check videos", disable=not progress or todo < 2,
                        mininterval=1, delay=PROGRESS_DELAY))
    if todo:
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(cache_file) as tmp:
                tmp.write_text(json.dumps(cache))
        except OSError:  # a read-only home: no cache, the check itself still ran
            pass
    return out


def _read_cache(path: Path) -> dict:
    """probe_all's cache: {key: probe's dict}. One that cannot be read, or is not of that shape
    (a damaged or foreign file), is said so in one line and started again; entries that are not
    probe results are dropped (their files are probed again)."""
    if not path.is_file():
        return {}
    try:
        doc = read_json(path)
    except ValueError as e:
        doc = e
    if not isinstance(doc, dict):
        print(f"{path}: not a video-check cache ({doc if isinstance(doc, ValueError) else type(doc).__name__}); "
              "starting it again", file=sys.stderr)
        return {}
    return {k: v for k, v in doc.items() if isinstance(v, dict) and is_number(v.get("end"))
            and (v.get("declared") is None or is_number(v.get("declared")))}


def resize_crop(frame, size: int):
    """A PyAV frame -> RGB uint8 (size, size, 3): short side resized to `size` (bicubic), centre crop."""
    w, h = frame.width, frame.height
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = frame.reformat(width=nw, height=nh, format="rgb24", interpolation="BICUBIC").to_ndarray()
    top, left = (nh - size) // 2, (nw - size) // 2
    return img[top:top + size, left:left + size]


def normalize(frames: torch.Tensor) -> torch.Tensor:
    """uint8 (..., 3, H, W) -> float32 with CLIP's mean and std."""
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return (frames.float() / 255 - mean) / std


def write_video(path, frames, fps: int) -> None:
    """Encode RGB uint8 frames (an array (T, H, W, 3) or any iterable of (H, W, 3) arrays, so long
    clips need not sit in memory) to an H.264 mp4 at `fps` (written to a temp name, then renamed)."""
    frames = iter(frames)
    first = next(frames, None)
    if first is None:
        raise ValueError(f"{path}: no frames to write")
    with atomic_path(path) as tmp, av.open(str(tmp), "w") as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = first.shape[1], first.shape[0], "yuv420p"
        s.options = {"crf": "20", "preset": "veryfast"}
        for img in itertools.chain([first], frames):
            c.mux(s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")))
        c.mux(s.encode())
