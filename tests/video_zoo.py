"""Video files as users have them, written with PyAV at small size: codecs, containers, frame rates,
start offsets, B-frames, several streams, audio longer than the video, an edit list, a raw stream,
an extreme aspect ratio, a rotation, truncation and corruption. Every frame carries its own index
(INDEX_BANDS grey bands across the central square, base 4), so a test reads back which frame each
sample is.

    write(path, times, **how)   frames 0..len(times)-1 shown at `times` (seconds); returns path
    read_index(frame)           the index a (3, S, S) uint8 frame shows
    collection(root)            [(file, what it tests, the shown times of its frames or None, the error or None)]
"""
from __future__ import annotations

import struct
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

LEVELS = (0, 85, 170, 255)
INDEX_BANDS = 5  # base-4 digits: indices 0..1023


def picture(i: int, w: int, h: int) -> np.ndarray:
    """RGB (h, w, 3): index i as INDEX_BANDS horizontal grey bands over the central square (side
    min(w, h), what a centre crop keeps), mid grey around it."""
    img = np.full((h, w, 3), 128, np.uint8)
    m = min(w, h)
    top, left = (h - m) // 2, (w - m) // 2
    for b in range(INDEX_BANDS):
        img[top + b * m // INDEX_BANDS: top + (b + 1) * m // INDEX_BANDS, left:left + m] = LEVELS[(i // 4 ** b) % 4]
    return img


def read_index(frame) -> int:
    """Inverse of picture for a (3, S, S) uint8 frame (tensor or array): the middle of each band."""
    f = np.asarray(frame, dtype=np.float32)
    s = f.shape[1]
    digits = []
    for b in range(INDEX_BANDS):
        band = f[:, b * s // INDEX_BANDS + s // (4 * INDEX_BANDS):(b + 1) * s // INDEX_BANDS - s // (4 * INDEX_BANDS),
                 s // 4: 3 * s // 4]
        digits.append(int(np.argmin([abs(float(band.mean()) - v) for v in LEVELS])))
    return sum(d * 4 ** b for b, d in enumerate(digits))


def write(path, times, codec="libx264", fmt=None, size=(64, 48), rate=None, options=None, b_frames=None,
          gop=None, audio=None, preview=None, pix_fmt="yuv420p", codec_options=None):
    """Frames 0..len(times)-1 at the presentation times `times` (s), in a container chosen by the
    suffix (or `fmt`). rate: the stream's nominal frame rate (default from the first two times);
    b_frames / gop: the encoder's B-frames and keyframe interval; audio: seconds of silence in an
    audio stream beside it; preview: (w, h) of a small video stream written first (every frame shows
    index 1023). Returns path."""
    path = Path(path)
    rate = rate or Fraction(1, 1) / Fraction(times[1] - times[0]).limit_denominator(1001)
    exact = all(abs(t * rate - round(t * rate)) < 1e-6 for t in times)  # on the rate's grid: tick = frame
    tb = 1 / Fraction(rate) if exact else Fraction(1, 90000)
    opts = dict(codec_options or {})
    if b_frames is not None:
        opts["bf"] = str(b_frames)
        if codec == "libx264":
            opts["x264-params"] = f"bframes={b_frames}"
    if gop is not None:
        opts["g"] = str(gop)
        if codec == "libx264":
            opts["x264-params"] = opts.get("x264-params", "") + (":" if "x264-params" in opts else "") + \
                f"keyint={gop}:min-keyint={gop}:scenecut=0"
    with av.open(str(path), "w", format=fmt, options=options or {}) as c:
        streams = []
        if preview is not None:
            p = c.add_stream(codec, rate=rate)
            p.width, p.height, p.pix_fmt, p.time_base = preview[0], preview[1], pix_fmt, tb
            streams.append((p, preview))
        s = c.add_stream(codec, rate=rate, options=opts)
        s.width, s.height, s.pix_fmt, s.time_base = size[0], size[1], pix_fmt, tb
        s.codec_context.time_base = tb
        streams.append((s, size))
        a = None
        if audio is not None:
            a = c.add_stream("aac", rate=16000)
            a.layout = "mono"
        for i, t in enumerate(times):
            for st, (w, h) in streams:
                frame = av.VideoFrame.from_ndarray(picture(4 ** INDEX_BANDS - 1 if st is not s else i, w, h), format="rgb24")
                frame = frame.reformat(format=pix_fmt)
                frame.pts, frame.time_base = int(round(t / tb)), tb
                c.mux(st.encode(frame))
        for st, _ in streams:
            c.mux(st.encode())
        if a is not None:
            chunk = 1024
            for k in range(int(audio * 16000) // chunk):
                af = av.AudioFrame.from_ndarray(np.zeros((1, chunk), np.float32), format="fltp", layout="mono")
                af.sample_rate, af.pts, af.time_base = 16000, k * chunk, Fraction(1, 16000)
                c.mux(a.encode(af))
            c.mux(a.encode())
    return path


def rotate_mp4(path, degrees: int) -> Path:
    """Write a display matrix of `degrees` (90 or 270) into an mp4's video track header (tkhd), as a
    phone does for a portrait clip it stores sideways."""
    data = bytearray(Path(path).read_bytes())
    at = data.find(b"tkhd")
    one, minus = 0x00010000, 0xFFFF0000
    matrix = {90: (0, one, 0, minus, 0, 0, 0, 0, 0x40000000), 270: (0, minus, 0, one, 0, 0, 0, 0, 0x40000000)}[degrees]
    data[at + 44: at + 80] = struct.pack(">9I", *matrix)
    Path(path).write_bytes(bytes(data))
    return Path(path)


def cut_with_edit_list(src, dst, start: float) -> Path:
    """What `ffmpeg -ss start -c copy` makes: the packets from the keyframe before `start` on (in
    decode order), their times moved so that `start` is 0; the frames before it (pre-roll) get
    negative times, which the mp4 muxer hides behind an edit list."""
    with av.open(str(src)) as i:
        si = i.streams.video[0]
        packets = [p for p in i.demux(si) if p.pts is not None]
        shift = int(round(start / si.time_base))
        key = max((p for p in packets if p.is_keyframe and p.pts <= shift), key=lambda p: p.pts)
        with av.open(str(dst), "w", format="mp4") as o:
            so = o.add_stream_from_template(si)
            for p in packets:
                if p.dts >= key.dts:
                    p.pts, p.dts, p.stream = p.pts - shift, p.dts - shift, so
                    o.mux(p)
    return Path(dst)


def collection(root) -> list:
    """The files, each (path, what it tests, the shown times of frames 0.. (None: never shown), the
    expected error or None). A frame's index is its position in `times`; shown times are those a
    player shows them at, counted from the first shown frame."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    out = []

    def add(name, what, times, shown=None, error=None, **how):
        path = write(root / name, times, **how)
        out.append((path, what, shown if shown is not None else [t - times[0] for t in times], error))
        return path

    even = [i / 10 for i in range(40)]  # 4 s at 10 fps
    add("h264.mp4", "H.264 in mp4 with B-frames", even, b_frames=3)
    add("mpeg4_bframes.avi", "MPEG-4 part 2 in AVI with B-frames", even, codec="mpeg4", b_frames=2)
    add("h264.avi", "H.264 in AVI with B-frames (frame times out of order)", even, b_frames=3)
    add("two_streams.mkv", "Matroska with a small preview stream first", even, preview=(32, 24))
    add("long_audio.mkv", "Matroska whose audio runs 5 s past its video", even, audio=9.0)
    add("offset.mkv", "Matroska starting at 10 s", [10 + t for t in even])
    add("long_gop.ts", "MPEG-TS with a 10 s keyframe interval", [i / 25 for i in range(750)], gop=250)
    add("ntsc.mp4", "29.97 fps", [i * 1001 / 30000 for i in range(90)], rate=Fraction(30000, 1001))
    add("fast.mp4", "120 fps", [i / 120 for i in range(360)])
    add("slow.mp4", "0.5 fps", [2.0 * i for i in range(6)])
    add("vfr.mkv", "variable frame rate", [0.0, 0.1, 0.15, 0.9, 1.0, 2.4, 2.45, 2.5, 3.7, 5.0], rate=Fraction(10))
    add("vp9.webm", "VP9 in WebM", even, codec="libvpx-vp9")
    add("mjpeg.avi", "Motion JPEG in AVI", even, codec="mjpeg", pix_fmt="yuvj420p")
    add("hevc.mkv", "HEVC in Matroska", even, codec="libx265", codec_options={"x265-params": "log-level=none"})
    add("odd.mkv", "an odd size (63 x 47), FFV1", even, codec="ffv1", size=(63, 47), pix_fmt="yuv444p")
    add("extreme.mkv", "an extreme aspect ratio (16 x 2000), FFV1", even[:20], codec="ffv1", size=(16, 2000),
        pix_fmt="yuv444p")
    add("raw.h264", "a raw H.264 stream (no timestamps)", even, fmt="h264")
    full = write(root / "uncut.mp4", [i / 10 for i in range(80)], gop=40)
    cut = cut_with_edit_list(full, root / "edit_list.mp4", 3.5)  # keyframes at 0 and 4 s: frames 0-34 are pre-roll
    out.append((cut, "an mp4 cut by stream copy (edit list, 3.5 s of hidden pre-roll)",
                [None] * 35 + [(i - 35) / 10 for i in range(35, 80)], None))
    rot = rotate_mp4(write(root / "rotated.mp4", even), 90)
    out.append((rot, "a phone clip stored sideways (90 degree display matrix)", [t for t in even], None))
    whole = write(root / "whole.mp4", [i / 10 for i in range(100)], options={"movflags": "faststart"})
    data = whole.read_bytes()
    trunc = root / "truncated.mp4"
    trunc.write_bytes(data[: len(data) // 2])
    out.append((trunc, "an mp4 cut in half (its index first)", None, "its frames end at"))
    corrupt = root / "corrupt.mp4"
    data = bytearray(data)
    data[len(data) // 2: len(data) // 2 + 64] = bytes(range(64))  # 64 bytes of picture data overwritten
    corrupt.write_bytes(bytes(data))
    out.append((corrupt, "an mp4 with 64 bytes of its picture data overwritten", None, "decoding failed after"))
    return out
