"""Bad input and broken runs: bad videos are found before training (and cached), a video that breaks
mid-run is skipped and counted, bad annotations and settings get one error naming what is wrong,
one run per run directory, --resume passes over a damaged checkpoint, a failed save leaves nothing
behind, a non-finite loss stops the run before the update, and the commands end with one line."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest

import batches
import checkpoint
import config
import data
import losses
import train
import video
from model import build_tiny_tokenizer

ROOT = Path(__file__).resolve().parent.parent


def _write(path, frames=30, fps=10, faststart=False):
    opts = {"movflags": "faststart"} if faststart else {}
    img = (np.random.default_rng(0).random((frames, 64, 96, 3)) * 255).astype(np.uint8)
    with av.open(str(path), "w", options=opts) as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = 96, 64, "yuv420p"
        for x in img:
            c.mux(s.encode(av.VideoFrame.from_ndarray(x, format="rgb24")))
        c.mux(s.encode())
    return path


def _audio_only(path):
    with av.open(str(path), "w") as c:
        s = c.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), dtype=np.float32), format="fltp", layout="mono")
        frame.sample_rate = 16000
        for packet in s.encode(frame):
            c.mux(packet)
        c.mux(s.encode())
    return path


@pytest.fixture(scope="module")
def bad_videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad_videos")
    _write(d / "good.mp4")
    (d / "empty.mp4").write_bytes(b"")
    (d / "text.mp4").write_text("not a video")
    _audio_only(d / "audio.m4a")
    whole = _write(d / "whole_faststart.mp4", frames=90, faststart=True).read_bytes()
    (d / "truncated.mp4").write_bytes(whole[: len(whole) // 2])  # its header still declares 9 s
    return d


@pytest.mark.parametrize("name, says", [("empty.mp4", "cannot open as a video"), ("text.mp4", "cannot open as a video"),
                                        ("audio.m4a", "has no video stream"), ("truncated.mp4", r"its frames end at 4.\d s, its video track declares 9.0 s")])
def test_probe_finds_each_bad_video(bad_videos, name, says):
    with pytest.raises(ValueError, match=rf"{name}: ({says})"):
        video.probe(bad_videos / name)
    assert video.probe(bad_videos / "good.mp4")["end"] == pytest.approx(2.9)


def test_a_truncated_video_is_refused_even_when_frames_are_capped(bad_videos):
    frames = video.sample_frames(bad_videos / "truncated.mp4", fps=1, size=32, max_frames=2)  # the first 2 s decode
    assert len(frames) == 2
    assert isinstance(video.probe_all([bad_videos / "truncated.mp4"], progress=False)[bad_videos / "truncated.mp4"], str)


def test_probe_all_is_cached_by_path_size_and_time(bad_videos, tmp_path, monkeypatch):
    monkeypatch.setenv(video.CACHE_ENV, str(tmp_path))
    clip = shutil.copy(bad_videos / "good.mp4", tmp_path / "clip.mp4")
    first = video.probe_all([clip], progress=False)
    monkeypatch.setattr(video, "probe", lambda p: pytest.fail("probed again"))
    assert video.probe_all([clip], progress=False) == first  # served from the cache
    os.utime(clip, ns=(1, 1))  # a changed file is probed again
    with pytest.raises(pytest.fail.Exception, match="probed again"):
        video.probe_all([clip], progress=False)


def _records(synthetic, n=3):
    return json.loads((synthetic / "tvg.json").read_text())[:n]


def test_bad_videos_stop_the_dataset_or_are_counted(synthetic, bad_videos, tmp_path, capsys):
    folder = tmp_path / "videos"
    shutil.copytree(synthetic / "videos", folder)
    shutil.copy(bad_videos / "text.mp4", folder / "broken.mp4")
    recs = _records(synthetic)
    recs[1] = {**recs[1], "video": "broken.mp4"}
    cfg, tok = config.PRESETS["tiny"], build_tiny_tokenizer(1000)
    with pytest.raises(ValueError, match=r"record 1: field 'video': .*broken.mp4: cannot open as a video .*\(1 records"):
        batches.VideoDataset(recs, folder, tok, cfg)
    ds = batches.VideoDataset(recs, folder, tok, cfg, on_error="skip")
    assert len(ds) == 2 and ds.skipped["bad_video"] == 1 and "1 with an unreadable video" in capsys.readouterr().err


def test_spans_past_the_end_of_the_video_are_counted(synthetic, capsys):
    recs = _records(synthetic)
    end = video.probe(synthetic / "videos" / recs[0]["video"])["end"]
    answer = {"from": "gpt", "value": f"The event happens in {end + 1.2:.1f} - {end + 2.5:.1f} seconds."}
    recs[0] = {**recs[0], "duration": end + 3, "conversations": [recs[0]["conversations"][0], answer]}  # within the slack
    ds = batches.VideoDataset(recs, synthetic / "videos", build_tiny_tokenizer(1000), config.PRESETS["tiny"])
    assert len(ds) == 3 and [i for i, _ in ds.past_end] == [0]
    assert "1 records have a span past the last frame" in capsys.readouterr().err


def test_a_video_that_breaks_mid_run_is_skipped(synthetic, tmp_path):
    folder = tmp_path / "videos"
    shutil.copytree(synthetic / "videos", folder)
    cfg, tok = config.PRESETS["tiny"], build_tiny_tokenizer(1000)
    recs = _records(synthetic)
    ds = batches.VideoDataset(recs, folder, tok, cfg)
    (folder / recs[0]["video"]).write_text("overwritten since the check")
    item = ds[0]
    assert "failed" in item and f"record 0: {folder / recs[0]['video']}" in item["failed"]
    batch = batches.collate([item, ds[1]], tok, tok, cfg)
    assert batch["input_ids"].shape[0] == 1 and len(batch["failed"]) == 1
    assert batches.collate([item], tok, tok, cfg) == {"failed": [item["failed"]]}


def test_training_survives_a_video_that_breaks_mid_run(synthetic, tmp_path, monkeypatch, capsys):
    real, calls = video.sample_frames, []

    def flaky(path, *a, **k):
        calls.append(path)
        if len(calls) == 2:
            raise ValueError(f"{path}: corrupt video, decoding failed after 3 frames (simulated)")
        return real(path, *a, **k)
    monkeypatch.setattr(video, "sample_frames", flaky)
    train.main(["--data", str(synthetic / "tvg.json"), "--videos", str(synthetic / "videos"), "--max-steps", "3",
                "--log-every", "1", "--out", str(tmp_path), "--name", "flaky", "--workers", "0", "--set", "batch_size=1"])
    rows = [json.loads(x) for x in (tmp_path / "flaky" / "sft" / "log.jsonl").read_text().splitlines()]
    assert rows[-1]["summary"] and rows[-1]["steps"] == 3
    assert [r.get("skipped_samples", 0) for r in rows[:-1]] == [0, 1, 1]
    assert "skipped: " in capsys.readouterr().err


@pytest.mark.parametrize("text, says", [
    ("-3.0 - 5.0 seconds", "a negative timestamp"), ("nan - 5.0 seconds", "a timestamp that is not a number"),
    ("from 4.0 to inf seconds", "a timestamp that is not a number")])
def test_answers_with_impossible_times_are_refused(text, says):
    rec = {"task": "tvg", "source": "s", "video": "v.mp4", "duration": 30.0,
           "conversations": [{"from": "human", "value": "<image>\nWhen?"}, {"from": "gpt", "value": text}]}
    with pytest.raises(data.BadRecord, match=rf"field 'conversations': {says}"):
        data.to_evidence(rec)
    rec["conversations"][0]["value"] = f"What happens at {text}?"
    rec["conversations"][1]["value"] = "A red square appears at 3.0 seconds."
    with pytest.raises(data.BadRecord, match=rf"field 'conversations': {says}"):
        data.to_evidence(rec)


def test_ranges_and_plain_numbers_stay_readable():
    assert data.extract_times("at 3 -5 seconds, then 10 to 12 s; -5 degrees")[1] == [[3.0, 5.0], [10.0, 12.0]]


@pytest.mark.parametrize("change, field, says", [
    ({"task": "xyz"}, "task", "unknown task 'xyz'"), ({"video": "../secret.mp4"}, "video", "relative path inside"),
    ({"video": "/abs/v.mp4"}, "video", "relative path inside"), ({"video": "C:\\v.mp4"}, "video", "relative path inside")])
def test_bad_record_fields(change, field, says):
    rec = {"task": "tvg", "source": "s", "video": "v.mp4", "duration": 30.0,
           "conversations": [{"from": "human", "value": "<image>\nWhen?"}, {"from": "gpt", "value": "At 3 - 5 seconds."}],
           **change}
    with pytest.raises(data.BadRecord, match=rf"field '{field}': .*{says}"):
        data.to_evidence(rec)


def test_bad_annotation_files(tmp_path):
    (tmp_path / "latin1.json").write_bytes('[{"q": "caf\xe9"}]'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.json: not UTF-8 text \(byte 11"):
        data.load_records(tmp_path / "latin1.json")
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(ValueError, match=r"empty.json: holds no records"):
        data.load_records(tmp_path / "empty.json")


@pytest.mark.parametrize("setting, says", [
    ("lr_lora=nan", r"lr_lora=nan is outside \[0, ∞\)"), ("w_gnd=inf", r"w_gnd=inf is outside \[0, ∞\)"),
    ("batch_size=-1", r"batch_size=-1 is outside \(0, ∞\)"), ("grad_accum=0", r"grad_accum=0 is outside"),
    ("fps=0", r"fps=0.0 is outside"), ("image_size=0", r"image_size=0 is outside"), ("warmup=1.5", r"warmup=1.5"),
    ("lr_other=-1e-4", r"lr_other=-0.0001 is outside"), ("image_size=100", "not a multiple of patch_size")])
def test_settings_are_checked_before_anything_starts(setting, says):
    with pytest.raises(SystemExit, match=says):
        config.configure(config.PRESETS["tiny"], [setting])


def _run(synthetic, out, name, *extra):
    train.main(["--data", str(synthetic / "tvg.json"), "--videos", str(synthetic / "videos"), "--out", str(out),
                "--name", name, "--workers", "0", "--log-every", "1", *extra])
    return out / name / "sft"


def test_a_non_finite_loss_stops_before_the_update(synthetic, tmp_path, monkeypatch):
    real, n = losses.sft_objective, []

    def poisoned(out, batch, cfg):
        terms = real(out, batch, cfg)
        n.append(1)
        return {**terms, "loss": terms["loss"] * float("nan")} if len(n) == 3 else terms
    monkeypatch.setattr(losses, "sft_objective", poisoned)
    with pytest.raises(SystemExit, match=r"step 3: the loss is nan .* The last good checkpoint is \S+step_000002"):
        _run(synthetic, tmp_path, "nan", "--max-steps", "5", "--save-every", "1")
    assert checkpoint.damaged(tmp_path / "nan" / "sft" / "step_000002") is None


def test_one_run_per_directory(synthetic, tmp_path):
    run_dir = tmp_path / "busy" / "sft"
    run_dir.mkdir(parents=True)
    holder = checkpoint.lock_run(run_dir)
    try:
        with pytest.raises(SystemExit, match=rf"{run_dir} is in use by pid {os.getpid()} on "):
            _run(synthetic, tmp_path, "busy", "--max-steps", "1")
    finally:
        holder.close()
    _run(synthetic, tmp_path, "busy", "--max-steps", "1")  # free again once the holder is gone


def test_resume_passes_over_a_damaged_checkpoint_and_cuts_the_log(synthetic, tmp_path, capsys):
    run_dir = _run(synthetic, tmp_path, "r", "--max-steps", "4", "--save-every", "1", "--keep", "4", "--stop-after", "3")
    weights = run_dir / "step_000003" / checkpoint.WEIGHTS
    raw = bytearray(weights.read_bytes())
    raw[-100:] = bytes(100)  # damage the newest checkpoint's tensors
    weights.write_bytes(bytes(raw))
    assert "model.safetensors changed" in checkpoint.damaged(run_dir / "step_000003")
    _run(synthetic, tmp_path, "r", "--max-steps", "4", "--save-every", "1", "--keep", "4", "--resume")
    assert f"--resume: passed over {run_dir / 'step_000003'} (model.safetensors changed" in capsys.readouterr().err
    rows = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "step" in r] == [1, 2, 3, 4]  # step 3 once: the old row was cut
    assert rows[-1]["summary"] and checkpoint.damaged(run_dir / "step_000004") is None


def test_a_failed_save_leaves_nothing_behind(synthetic, tmp_path, monkeypatch):
    run_dir = _run(synthetic, tmp_path, "full", "--max-steps", "2", "--stop-after", "1")

    def no_space(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(checkpoint.torch, "save", no_space)
    with pytest.raises(OSError, match=rf"{run_dir / 'step_000002'}: saving the checkpoint failed .*No space left"):
        _run(synthetic, tmp_path, "full", "--max-steps", "2", "--resume")
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith(("step_", ".step"))) == ["step_000001"]


@pytest.mark.parametrize("argv, says", [
    (["train.py", "--set", "lr_lora=nan"], "error: --set: lr_lora=nan is outside"),
    (["train.py", "--data", "missing.json", "--videos", "."], "error: missing.json: annotation file not found"),
    (["evaluate.py", "--ckpt", "no_such_dir", "--data", "x.json", "--videos", "."], "error: ")])
def test_commands_end_with_one_line_and_exit_code_2(argv, says, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, str(ROOT / argv[0]), *argv[1:], "--out", str(tmp_path)] if argv[0] == "train.py"
                       else [sys.executable, str(ROOT / argv[0]), *argv[1:]], capture_output=True, text=True,
                       cwd=tmp_path, env=env)
    lines = r.stderr.splitlines()  # nothing else: no library warning, no progress bar
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith(says), r.stderr
    debug = subprocess.run([sys.executable, str(ROOT / argv[0]), *argv[1:]], capture_output=True, text=True,
                           cwd=tmp_path, env={**env, "D2VLM_DEBUG": "1"})
    assert debug.returncode == 2 and "Traceback" in debug.stderr


def test_a_video_longer_than_its_annotation_is_never_cut(synthetic):
    """The frame count comes from the video's decoded end, not the annotated duration: every frame
    is sampled, or the record is left out as too long (counted), never cut to fit."""
    rec = _records(synthetic, 1)[0]
    end = video.probe(synthetic / "videos" / rec["video"])["end"]
    answer = {"from": "gpt", "value": "The event happens in 1.0 - 2.0 seconds."}
    short = {**rec, "duration": end - 3, "conversations": [rec["conversations"][0], answer]}  # within the slack
    cfg, tok = config.PRESETS["tiny"], build_tiny_tokenizer(1000)
    ds = batches.VideoDataset([short], synthetic / "videos", tok, cfg)
    assert len(ds[0]["frames"]) == int(end * cfg.fps) + 1 > short["duration"] + 1
    ev = data.to_evidence(short, cfg.fps)
    n_text = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in
                 (batches.CHAT[0].format(system=cfg.system_prompt, prompt=ev["prompt"]), batches.CHAT[1].format(response=ev["response"])))
    need = n_text - 1 + len(ds[0]["frames"])  # the placeholder becomes one token per frame
    fits = batches.VideoDataset([short], synthetic / "videos", tok, config.configure(cfg, [f"max_len={need}"]))
    assert len(fits) == 1 and len(fits[0]["frames"]) == len(ds[0]["frames"])
    tight = batches.VideoDataset([short], synthetic / "videos", tok, config.configure(cfg, [f"max_len={need - 1}"]))
    assert len(tight) == 0 and tight.skipped["too_long"] == 1  # with the annotated duration it would have fit
