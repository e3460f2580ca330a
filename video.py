"""Frames: PyAV decoding at 1 fps and CLIP normalisation; writing mp4 files.

Paper: "Experiments / implementation details" (frames sampled at 1 fps, 224 px). docs/design.md#model.

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
TAIL_BACK = (3.0, 30.0)  # seconds before the declared end probe() seeks to, then further back (then decodes all)
TRUNCATION_SLACK = 1.0  # seconds of declared duration a video may lack before it counts as truncated
# containers whose frame times are not presentation times: AVI stamps frames in decode order, one per
# tick of its constant rate, so frame i is shown at i / rate (FFmpeg's own reading reorders them wrongly)
INDEX_TIMED = ("avi",)
EXTREME_ASPECT = 8  # a frame longer than this many times its crop is cropped before it is scaled (the scaler's limits)
CACHE_ENV = "D2VLM_CACHE"  # the folder of probe_all's cache (default ~/.cache/d2vlm)
PROBE_VERSION = 2  # in the cache's keys: a probe of another version is made again
# FFmpeg's demuxers of single pictures (the *_pipe ones too: png_pipe, jpeg_pipe, ...): a PNG renamed .mp4
# opens as a 1-frame "video", and is refused as the picture it is
STILL_IMAGE_FORMATS = ("image2", "image2pipe")
PROGRESS_DELAY = 2.0  # seconds before the check's progress bar shows: a quick check prints nothing

def _open(path: Path):
    """(the open container, its main video stream: the largest picture, attached cover art left out),
    or one error naming the file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: video file not found")
    try:
        container = av.open(str(path))
    except (av.FFmpegError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot open as a video ({e})") from None
    streams = [s for s in container.streams.video if not s.disposition & av.stream.Disposition.attached_pic]
    if not streams:
        container.close()
        raise ValueError(f"{path}: has no video stream (audio-only or not a video)")
    if container.format.name in STILL_IMAGE_FORMATS or container.format.name.endswith("_pipe"):
        name = container.format.name
        container.close()
        raise ValueError(f"{path}: a still image ({name}), not a video")
    return container, max(streams, key=lambda s: (s.codec_context.width or 0) * (s.codec_context.height or 0))


class _Clock:
    """The presentation time (s) of each frame a stream decodes, in order: the container's own where it
    is one; frame index / rate where it is not (INDEX_TIMED containers, frames without timestamps:
    raw streams). Times never go backwards."""

    def __init__(self, container, stream, path):
        self.by_index = container.format.name in INDEX_TIMED
        # FFmpeg's guess reads the codec's own rate where the container has none (a raw stream's
        # demuxer reports 25 whatever the stream says)
        self.rate = float(stream.guessed_rate or stream.average_rate or stream.base_rate or 0)
        self.path, self.n, self.last = path, 0, float("-inf")

    def __call__(self, frame) -> float:
        if self.by_index or frame.pts is None:
            if not self.rate:
                raise ValueError(f"{self.path}: frames without timestamps in a stream without a frame rate: "
                                 "when each frame is shown is unknown")
            t = self.n / self.rate
        else:
            t = float(frame.time)
        self.n += 1
        self.last = max(self.last, t)
        return self.last


def _declared_end(container, stream):
    """(the time the file says the video ends at, absolute s; where it says so: "video track", or
    "container" (all streams: audio may outlast the video, so only a hint)), or (None, None)."""
    if stream.duration:
        return float(((stream.start_time or 0) + stream.duration) * stream.time_base), "video track"
    tag = stream.metadata.get("DURATION")  # Matroska's track end, h:mm:ss.nnnnnnnnn
    if tag:
        try:
            h, m, sec = tag.split(":")
            return int(h) * 3600 + int(m) * 60 + float(sec), "video track"
        except ValueError:
            pass
    if container.duration:
        return ((container.start_time or 0) + container.duration) / av.time_base, "container"
    return None, None


def _truncated(path, length, declared, rate, stopped=None) -> None:
    """ValueError when the frames end more than TRUNCATION_SLACK (and a frame) before the length the
    video track declares (both s from the first shown frame); `stopped`: the decoding error that
    ended them, if one did."""
    if declared is not None and declared - length > TRUNCATION_SLACK + (1 / rate if rate else 0):
        why = f"decoding stopped there ({stopped})" if stopped else "a truncated file, or a header that overstates it"
        raise ValueError(f"{path}: its frames end at {length:.1f} s, its video track declares {declared:.1f} s ({why})")


def sample_frames(path, fps: float = 1.0, size: int = 224, max_frames: int | None = None,
                  upright: bool = False) -> torch.Tensor:
    """Decode `path` once, front to back, and keep for every k with k/fps <= (time of the last frame)
    the frame nearest to t = k/fps (ties go to the earlier frame), times counted from the first shown
    frame (_Clock). Each kept frame is resized so its short side is `size` (bicubic) and
    centre-cropped (resize_crop); `upright`: turned as the file's display matrix says (a phone's
    portrait clip), else as stored, as the release reads frames. Returns uint8 (T, 3, size, size),
    channels last in memory (torch.channels_last), filled in place in one array sized from the video
    track's length (grown only when the frames outlast it). With `max_frames`, decoding stops after that many frames (the first max_frames/fps
    seconds). Missing, unreadable, audio-only, frameless or truncated files raise an error naming
    the file."""
    path = Path(path)
    container, stream = _open(path)
    with container:
        stream.thread_type = "AUTO"
        clock, (end, source) = _Clock(container, stream, path), _declared_end(container, stream)
        out, k, prev, t0, picked = None, 0, None, None, None
        try:
            for frame in container.decode(stream):
                t = clock(frame)
                if t0 is None:
                    t0 = t
                    cap = max_frames if max_frames is not None else int((end - t0) * fps) + 2 if end else 64
                    # numpy, as decoded (no transposing): a torch copy per frame would wake torch's threads, and
                    # their spinning slows FFmpeg's decoding threads on a small machine
                    out = np.empty((max(cap, 1), size, size, 3), dtype=np.uint8)
                t -= t0
                while t >= k / fps and (max_frames is None or k < max_frames):
                    pick = prev if prev is not None and k / fps - prev[0] <= t - k / fps else (t, frame, clock.n)
                    if k == len(out):  # the frames outlast the header's length
                        out = np.concatenate([out, np.empty_like(out)])
                    if pick[2] == picked:  # a frame serving several k (fps above the video's rate)
                        out[k] = out[k - 1]
                    else:
                        out[k] = resize_crop(pick[1], size, upright)
                        picked = pick[2]
                    k += 1
                if max_frames is not None and k >= max_frames:
                    break
                prev = (t, frame, clock.n)
        except av.FFmpegError as e:
            raise ValueError(f"{path}: corrupt video, decoding failed after {k} frames ({e})") from None
    if not k:
        raise ValueError(f"{path}: no decodable video frames")
    if max_frames is None and source == "video track":
        _truncated(path, prev[0], end - t0, clock.rate)
    out = out[:k] if 4 * k >= 3 * len(out) else out[:k].copy()  # a header far too long: give the rest back
    return torch.from_numpy(out).permute(0, 3, 1, 2)  # (T, 3, size, size), channels last in memory


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
    main video stream, decode the first frame, seek near the end and decode to the last frame
    (further back when a seek lands where nothing decodes, a long keyframe interval; every frame
    where frame times are by index). Returns {"end": the last frame's time, "declared": the length
    the video track declares, or None when only the container declares one (its audio may outlast
    the video)}, both in seconds from the first shown frame. Raises ValueError naming the file when
    it cannot be opened, has no video stream or no frame, fails to decode, or its frames end more
    than TRUNCATION_SLACK seconds short of its video track's length (a truncated file)."""
    path = Path(path)
    container, stream = _open(path)
    with container:
        clock, (end, source) = _Clock(container, stream, path), _declared_end(container, stream)
        frames = container.decode(stream)
        try:
            first = next(frames, None)
        except av.FFmpegError as e:
            raise ValueError(f"{path}: corrupt video, decoding failed ({e})") from None
        if first is None:
            raise ValueError(f"{path}: no decodable video frames")
        t0 = last = clock(first)
        if clock.by_index or end is None or end - t0 <= TAIL_BACK[0]:  # every frame, with the same decoder
            last, stopped = _last(frames, clock, last)
        else:
            for back in (*TAIL_BACK, None):
                container.seek(int(max(end - back, 0) / stream.time_base) if back else 0, stream=stream, backward=True)
                tail, stopped = _last(container.decode(stream), lambda f: float(f.time) if f.pts is not None else None)
                if tail is not None:  # decoded from a keyframe on: the last frame is among these
                    last = max(last, tail)
                    break
    declared = end - t0 if source == "video track" else None
    _truncated(path, last - t0, declared, clock.rate, stopped)
    return {"end": last - t0, "declared": declared}


def _last(frames, time_of, last=None):
    """(the latest time_of(frame) over `frames` (None: no timed frame), the decoding error that ended
    them or None)."""
    try:
        for frame in frames:
            t = time_of(frame)
            if t is not None:
                last = t if last is None else max(last, t)
    except av.FFmpegError as e:
        return last, e
    return last, None


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
        return f"v{PROBE_VERSION}|{Path(p).resolve()}|{st.st_size}|{st.st_mtime_ns}"

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


def resize_crop(frame, size: int, upright: bool = False):
    """A PyAV frame -> RGB uint8 (size, size, 3): short side resized to `size` (bicubic), centre crop.
    A frame more than EXTREME_ASPECT times as long as wide (or wide as long) is cropped to its central
    square first, in source pixels (scaling it whole would ask the scaler for a picture millions of
    pixels long). upright: turned as frame.rotation (the display matrix) says."""
    turn, w, h = frame.rotation, frame.width, frame.height
    if max(w, h) > EXTREME_ASPECT * min(w, h):
        m = min(w, h)
        img = frame.to_ndarray(format="rgb24")[(h - m) // 2:(h - m) // 2 + m, (w - m) // 2:(w - m) // 2 + m]
        frame, w, h = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24"), m, m
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = frame.reformat(width=nw, height=nh, format="rgb24", interpolation="BICUBIC").to_ndarray()
    top, left = (nh - size) // 2, (nw - size) // 2
    img = img[top:top + size, left:left + size]
    return np.ascontiguousarray(np.rot90(img, turn // 90)) if upright and turn else img


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
