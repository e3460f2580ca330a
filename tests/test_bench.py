"""bench.py's comparisons are only fair if the alternatives do the same work: the seek-per-sample
sampler must pick exactly the frames of data.sample_frames."""
import pytest
import torch

import bench
import data
from test_data import index_clip, read_index


@pytest.mark.parametrize("video_fps,fps,n", [(7, 1.0, 60), (25, 1.0, 300), (3, 0.5, 40), (2, 4.0, 30)])
def test_seek_sampler_takes_the_frames_of_the_sequential_one(tmp_path, video_fps, fps, n):
    index_clip(tmp_path / "c.mp4", n, video_fps)
    ref = data.sample_frames(tmp_path / "c.mp4", fps=fps, size=48)
    seek = bench.sample_frames_seek(tmp_path / "c.mp4", fps=fps, size=48)
    assert [read_index(f) for f in seek] == [read_index(f) for f in ref]
    assert torch.equal(seek, ref)


def test_make_clip_streams_frames_and_is_reused(tmp_path):
    clip = bench.make_clip(tmp_path / "m.mp4", 3, 64, 48, 10)
    frames = data.sample_frames(clip, fps=1.0, size=48)
    assert frames.shape == (3, 3, 48, 48)  # t = 0, 1, 2 s of a 3-s clip
    mtime = clip.stat().st_mtime_ns
    assert bench.make_clip(tmp_path / "m.mp4", 3, 64, 48, 10).stat().st_mtime_ns == mtime


def test_realsize_rows_on_a_small_preset():
    """The real-size code path (CUDA in bench.py) at tiny size on the CPU: the figures come out and
    the projection is (SFT step + FPO step) per sample x 164K samples / N GPUs."""
    rows = {what: value for _, what, value, *_ in bench.realsize_figures("tiny", frames=8, steps=1, device="cpu")}
    sft, fpo = rows["SFT step"], rows["FPO step (packed pair)"]
    assert sft > 0 and fpo > 0 and rows["samples/s"] == pytest.approx(4 / sft)  # tiny: batch 4
    hours = {n: rows[f"E.T.Instruct-164K SFT + FPO on {n} GPU(s) (projected, ideal scaling)"] for n in (1, 4, 8)}
    assert hours[1] == pytest.approx(164_000 * (sft + fpo) / 4 / 3600) and hours[4] == pytest.approx(hours[1] / 4)
