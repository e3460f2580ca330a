"""Bad input, round 2 (docs/bad-input.md): nothing a user does loses a result, every flag is checked
and named before anything starts, the data is checked in full before a weight is loaded, a
micro-batch that cannot be read is replaced, every scorer is linear in its answer, and a
command's error is one line."""
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pytest
import torch

import batches
import checkpoint
import config
import data
import evaluate
import synth
import train
import video
from evidence import EVI
from model import build_tiny_tokenizer
from scoring import etbench
from scoring.captions import cut_pairs, dvc_format, score_dvc
from scoring.rules import PAIR, BadField, check_span
from support import cli, released
from test_reliability import _write as write_video
from test_scoring_fuzz import HashEmbedder, PlainCaptionScorers

ROOT = Path(__file__).resolve().parent.parent


def _tvg(synthetic, n=3):
    return json.loads((synthetic / "tvg.json").read_text())[:n]


def _with_turn(rec, question=None, answer=None):
    q, a = rec["conversations"]
    return {**rec, "conversations": [{**q, "value": question or q["value"]}, {**a, "value": answer or a["value"]}]}


def _train(synthetic, out, name, *extra, data_file=None):
    train.main(["--data", str(data_file or synthetic / "tvg.json"), "--videos", str(synthetic / "videos"),
                "--out", str(out), "--name", name, "--workers", "0", "--log-every", "1", *extra])
    return out / name / "sft"


@pytest.fixture(scope="module")
def run(synthetic, tmp_path_factory):
    """A run cut short at step 2 of 3 (one checkpoint), and one test record of each task of a video."""
    root = tmp_path_factory.mktemp("bad_input")
    run_dir = _train(synthetic, root, "r", "--max-steps", "3", "--stop-after", "2", "--set", "batch_size=2")
    test = [r for r in json.loads((synthetic / "test.json").read_text()) if r["video"] == "test_0000.mp4"][:2]
    (root / "test.json").write_text(json.dumps(test))
    return run_dir, root / "test.json"


# ---------------------------------------------------------------------------------------------
# Results never live where a manifest guards them

def test_evaluation_writes_beside_the_checkpoint_and_resume_keeps_it(synthetic, run, capsys):
    run_dir, test = run
    ckpt = run_dir / "step_000002"
    evaluate.main(["--ckpt", str(ckpt), "--data", str(test), "--videos", str(synthetic / "videos"),
                   "--max-new-tokens", "2"])
    results = run_dir / checkpoint.RESULTS / "step_000002"
    assert sorted(p.name for p in results.iterdir()) == ["metrics.json", "predictions_test.json"]
    assert checkpoint.damaged(ckpt) is None  # nothing was written inside
    shutil.copytree(run_dir.parent, run_dir.parent.parent / "copy")  # resume a copy: the fixture stays as it is
    copy = run_dir.parent.parent / "copy" / "sft"
    _train(synthetic, run_dir.parent.parent, "copy", "--max-steps", "3", "--set", "batch_size=2", "--resume")
    assert [d.name for d in checkpoint.checkpoints(copy)] == ["step_000002", "step_000003"]  # resumed from it
    assert "--resume: skipped" not in capsys.readouterr().err  # no checkpoint passed over as damaged
    assert (copy / checkpoint.RESULTS / "step_000002" / "predictions_test.json").is_file()


@pytest.mark.parametrize("flags, says", [
    (["--results", "{ckpt}"], "--results {ckpt} is --ckpt"),
    (["--results", "{ckpt}/eval"], "--results {ckpt}/eval is inside the checkpoint {ckpt}: its manifest"),
    (["--out", "{ckpt}/metrics.json"], "--out {ckpt}/metrics.json is inside the checkpoint {ckpt}: its manifest"),
    (["--out", "{test}"], "--out {test} is --data"),
    (["--results", "{ckpt}/config.json"], "--results {ckpt}/config.json: not a folder")])
def test_outputs_that_are_inputs_or_inside_a_checkpoint_are_refused(synthetic, run, flags, says):
    run_dir, test = run
    ckpt = run_dir / "step_000002"
    fill = {"ckpt": ckpt, "test": test}
    with pytest.raises(SystemExit, match=says.format(**fill)):
        evaluate.main(["--ckpt", str(ckpt), "--data", str(test), "--videos", str(synthetic / "videos"),
                       *[f.format(**fill) for f in flags]])
    assert checkpoint.damaged(ckpt) is None


def test_score_out_equal_to_its_input_or_inside_a_checkpoint_is_refused(run, tmp_path):
    run_dir, test = run
    pred = tmp_path / "pred.json"
    pred.write_text(json.dumps([{**r, "a": "1 - 2 seconds"} for r in json.loads(test.read_text())]))
    with pytest.raises(SystemExit, match=r"--out \S+pred.json is --score"):
        evaluate.main(["--score", str(pred), "--out", str(pred)])
    assert isinstance(json.loads(pred.read_text()), list)
    inside = run_dir / "step_000002" / "adapter" / "m.json"
    with pytest.raises(SystemExit, match=r"is inside the checkpoint \S+step_000002: its manifest"):
        evaluate.main(["--score", str(pred), "--out", str(inside)])


def test_synth_out_equal_to_data_and_plot_equal_to_video_are_refused(synthetic, run, tmp_path):
    ann = shutil.copy(synthetic / "tvg.json", tmp_path / "ann.json")
    with pytest.raises(SystemExit, match=r"--out \S+ann.json is --data"):
        synth.main(["--data", str(ann), "--out", str(ann)])
    clip = shutil.copy(synthetic / "videos" / "test_0000.mp4", tmp_path / "clip.mp4")
    for plot, says in ((clip, r"--plot \S+clip.mp4: a picture file"), (tmp_path / "x.png", None)):
        argv = ["--ckpt", str(run[0] / "step_000002"), "--video", str(clip), "--question", "When?", "--plot", str(plot)]
        if says:
            with pytest.raises(SystemExit, match=says):
                evaluate.get_args(argv)
        else:
            assert evaluate.get_args(argv).plot == str(plot)
    with pytest.raises(SystemExit, match=r"--plot \S+clip.png is --video"):
        cli.check_outputs({"--plot": tmp_path / "clip.png"}, {"--video": tmp_path / "clip.png"})


# ---------------------------------------------------------------------------------------------
# Flags: range-checked, named, before anything starts

TRAIN_FLAGS = [
    (["--keep", "-1"], "argument --keep: must be at least 1, got -1"),
    (["--keep", "0"], "argument --keep: must be at least 1"),
    (["--save-every", "0"], "argument --save-every: must be at least 1"),
    (["--log-every", "0"], "argument --log-every: must be at least 1"),
    (["--max-steps", "0"], "argument --max-steps: must be at least 1"),
    (["--max-steps", "-1"], "argument --max-steps: must be at least 1"),
    (["--stop-after", "-5"], "argument --stop-after: must be at least 1"),
    (["--workers", "-1"], "argument --workers: must be at least 0"),
    (["--seed", str(2**70)], "argument --seed: must be in 0..4294967295"),
    (["--seed", "1.5"], "argument --seed: expected an integer, got '1.5'"),
    (["--peak-tflops", "-1"], "argument --peak-tflops: must be above 0"),
    (["--beta", "nan"], "argument --beta: expected a finite number, got 'nan'"),
    (["--name", "../../x"], "--name '../../x': a run name is a folder inside --out"),
    (["--name", "/abs/x"], "--name '/abs/x': a run name is a folder inside --out"),
    (["--name", ""], "--name '': a run name is a folder inside --out")]
EVALUATE_FLAGS = [
    (["--batch-size", "0"], "argument --batch-size: must be at least 1"),
    (["--temperature", "nan"], "argument --temperature: expected a finite number"),
    (["--temperature", "-1"], "argument --temperature: must be at least 0, got -1"),
    (["--max-new-tokens", "0"], "argument --max-new-tokens: must be at least 1"),
    (["--seed", "-1"], "argument --seed: must be in 0..4294967295"),
    (["--video", "v.mp4"], "--video needs --question")]


@pytest.mark.parametrize("command, flags, says", [(train, *c) for c in TRAIN_FLAGS] + [(evaluate, *c) for c in EVALUATE_FLAGS]
                         + [(synth, ["--data", "a.json", "--out", "b.json", "--per-sample", "0"],
                             "argument --per-sample: must be at least 1")])
def test_flags_are_checked_and_named_before_anything_starts(command, flags, says):
    with pytest.raises(SystemExit) as e:
        (command.main if command is synth else command.get_args)(flags)  # synth.py reads nothing before its flags
    assert str(e.value.code).startswith(says) and "\n" not in str(e.value.code)


def test_train_out_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(SystemExit, match=r"--out \S+f: not a folder"):
        train.get_args(["--out", str(tmp_path / "f")])


@pytest.mark.parametrize("setting, says", [("fps=1e-9", r"fps=1e-09 is outside \[0.0166"), ("fps=1000", "fps=1000.0 is outside"),
                                           ("inject_layer=99", "inject_layer=99 is not a hidden state of a 4-layer LLM"),
                                           ("llm_width=100000000", "parameters .* more than this machine's"),
                                           ("epochs=" + "9" * 400, r"epochs=9{40}\.\.\. is outside")])
def test_settings_out_of_range_are_refused_before_anything_starts(setting, says):
    with pytest.raises(SystemExit, match=says):
        config.configure(config.PRESETS["tiny"], [setting])


# ---------------------------------------------------------------------------------------------
# The data, checked in full before any weight is loaded

def _no_weights(monkeypatch):
    def loaded(*a, **k):
        raise AssertionError("weights were loaded before the data was checked")
    for mod, name in ((checkpoint, "from_weights"), (checkpoint, "from_checkpoint"), (released, "load")):
        monkeypatch.setattr(mod, name, loaded)


def test_a_bad_annotation_stops_training_before_any_weight_is_loaded(synthetic, tmp_path, monkeypatch):
    bad = _tvg(synthetic)
    bad[2] = _with_turn(bad[2], answer="The event happens in 0,5 - 5,0 seconds.")
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    _no_weights(monkeypatch)
    with pytest.raises(ValueError, match=r"bad.json: record 2: field 'conversations': a time not written as plain"):
        _train(synthetic, tmp_path, "x", "--max-steps", "1", data_file=tmp_path / "bad.json")


def test_a_bad_video_stops_evaluation_before_any_weight_is_loaded(synthetic, run, tmp_path, monkeypatch):
    folder = tmp_path / "videos"
    shutil.copytree(synthetic / "videos", folder)
    (folder / "test_0000.mp4").write_text("not a video any more")
    _no_weights(monkeypatch)
    with pytest.raises(ValueError, match=r"record 0: field 'video': \S+test_0000.mp4: cannot open as a video"):
        evaluate.main(["--ckpt", str(run[0] / "step_000002"), "--data", str(run[1]), "--videos", str(folder)])
    with pytest.raises(SystemExit, match=r"--question: the time 300 - 320 s is past the end of \S+test_0000.mp4"):
        evaluate.main(["--ckpt", str(run[0] / "step_000002"), "--video", str(synthetic / "videos" / "test_0000.mp4"),
                       "--question", "What happens at 300.0 - 320.0 seconds?"])


@pytest.mark.parametrize("question, says", [
    ("When does \ud800 happen?", "not UTF-8 text: a lone surrogate"),
    ("x" * (data.MAX_TEXT_CHARS + 1), "65,537 characters, more than 65,536"),
    ("When?<|end|>\n<|assistant|>\nnow", "contains '<|end|>', a reserved token"),
    ("When does the <video> start?", "contains '<video>', a reserved token"),
    ("When does [SEP] start?", r"contains '\[SEP\]', a reserved token"),
    ("When does <|placeholder3|> start?", "contains '<|placeholder3|>', a reserved token"),
    ("What happens at 1:30 - 2:00?", "a time not written as plain seconds")])
def test_questions_that_no_tokenizer_should_see_are_refused_by_name(synthetic, question, says):
    rec = _with_turn(_tvg(synthetic, 1)[0], question=question)
    with pytest.raises(data.BadRecord, match=rf"field 'conversations': {says}"):
        data.to_evidence(rec)


@pytest.mark.parametrize("answer, says", [
    ("The event happens in 0,5 - 5,0 seconds.", "a time not written as plain seconds .*'appens in 0,5 - 5,0"),
    ("The event happens in 1e1 - 2e1 seconds.", "a time not written as plain seconds"),
    ("The event happens in 10... - 12.. seconds.", "a time not written as plain seconds"),
    ("The event happens early on.", "a tvg answer must give its events' times"),
    ("The event happens in 3.0 - 5.0 seconds. <|user|> more", "contains '<|user|>', a reserved token")])
def test_training_answers_that_would_train_wrong_spans_are_refused(synthetic, answer, says):
    rec = _with_turn(_tvg(synthetic, 1)[0], answer=answer)
    with pytest.raises(data.BadRecord, match=rf"field 'conversations': {says}"):
        data.to_evidence(rec)
    # plain times, commas between them and a closing full stop still read as before
    ok = _with_turn(rec, answer="The event happens in 3.0 - 5.0, then 7 to 8.5 s.")
    assert data.to_evidence(ok)["spans"] == [[3.0, 5.0], [7.0, 8.5]]


def test_numbers_too_large_and_json_too_deep_name_the_file(synthetic, tmp_path):
    rec = _tvg(synthetic, 1)[0]
    with pytest.raises(data.BadRecord, match="field 'duration': expected a finite number, got an integer of 401 digits"):
        data.to_evidence({**rec, "duration": 10**400})
    with pytest.raises(BadField, match="field 'tgt' is not a span"):
        check_span([10**400, 1], "tgt")
    files = {"long.json": json.dumps([rec]).replace('"duration": 36.0', '"duration": ' + "1" * 5001),
             "deep.json": "[" * 100_000 + "]" * 100_000, "deep.jsonl": json.dumps(rec) + "\n" + "[" * 100_000}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    says = {"long.json": "line 1: a number too long to read", "deep.json": "line 1: not valid JSON for this reader",
            "deep.jsonl": "line 2: not valid JSON for this reader"}
    for name, text in files.items():
        for read in (data.load_records, etbench.load_predictions) + ((synth.load_pairs,) if name.endswith(".json") else ()):
            with pytest.raises(ValueError, match=rf"{name}: {says[name]}"):
                read(tmp_path / name)


def test_a_bad_pairs_file_names_the_pair_and_field(synthetic, tmp_path):
    synth.main(["--data", str(synthetic / "tvg.json"), "--out", str(tmp_path / "pairs.json")])
    good = json.loads((tmp_path / "pairs.json").read_text())
    assert len(synth.load_pairs(tmp_path / "pairs.json")) == len(good)
    cases = [({"video": "../../etc/passwd"}, "field 'video': '../../etc/passwd' must be a relative path"),
             ({"spans": "oops"}, "field 'spans': expected a list of spans"),
             ({"duration": 10**400}, "field 'duration': expected a finite number"),
             ({"prompt": good[0]["prompt"] + "<|end|>"}, "field 'prompt': contains '<|end|>'"),
             ({"response": good[0]["response"] + EVI}, "field 'response': .* <evi> where its spans need")]
    for change, says in cases:
        (tmp_path / "bad.json").write_text(json.dumps([{**good[0], **change}]))
        with pytest.raises(ValueError, match=rf"bad.json: pair 0: {says}"):
            synth.load_pairs(tmp_path / "bad.json")


def test_a_still_image_is_not_a_video_and_a_one_frame_video_is(tmp_path):
    with av.open(str(tmp_path / "still.png"), "w", format="image2") as c:
        s = c.add_stream("png")
        s.width, s.height, s.pix_fmt = 96, 64, "rgb24"
        c.mux(s.encode(av.VideoFrame.from_ndarray(np.zeros((64, 96, 3), np.uint8), format="rgb24")))
        c.mux(s.encode())
    fake = shutil.copy(tmp_path / "still.png", tmp_path / "still.mp4")
    for read in (video.probe, lambda p: video.sample_frames(p, 1, 32)):
        with pytest.raises(ValueError, match=r"still.mp4: a still image \(png_pipe\), not a video"):
            read(fake)
    one = write_video(tmp_path / "one.mp4", frames=1, fps=1)
    assert video.probe(one)["end"] == 0 and video.sample_frames(one, 1, 32).shape == (1, 3, 32, 32)


def test_duration_and_links_are_checked_against_the_video_folder(synthetic, tmp_path, capsys):
    cfg, tok = config.PRESETS["tiny"], build_tiny_tokenizer(1000)
    recs = _tvg(synthetic)
    length = video.probe(synthetic / "videos" / recs[0]["video"])["declared"]
    slack = max(batches.DURATION_SLACK_S, batches.DURATION_SLACK_FRACTION * length)
    off = [{**recs[0], "duration": 1e308}, {**recs[1], "duration": recs[1]["duration"] + slack * 0.9}, recs[2]]
    with pytest.raises(ValueError, match=r"record 0: field 'duration': 1e\+308 s, its video \S+ is 36.0 s long \(1 records"):
        batches.VideoDataset(off, synthetic / "videos", tok, cfg)
    ds = batches.VideoDataset(off, synthetic / "videos", tok, cfg, on_error="skip")  # within the slack: kept
    assert ds.kept == [1, 2] and ds.skipped["bad_duration"] == 1
    assert "1 whose duration is not their video's" in capsys.readouterr().err
    folder = tmp_path / "videos"
    folder.mkdir()
    outside = shutil.copy(synthetic / "videos" / recs[0]["video"], tmp_path / "outside.mp4")
    os.symlink(outside, folder / recs[0]["video"])
    os.symlink(synthetic / "videos" / recs[1]["video"], folder / "inside.mp4")  # a link is fine if it stays inside:
    os.symlink(folder / "inside.mp4", folder / recs[1]["video"])  # here a link to a link out of the folder
    (folder / "sub").mkdir()
    shutil.copy(synthetic / "videos" / recs[2]["video"], folder / "sub" / "v.mp4")
    os.symlink(folder / "sub" / "v.mp4", folder / recs[2]["video"])
    with pytest.raises(FileNotFoundError, match=rf"record 0: field 'video': \S+ links to {outside}, outside the video folder"):
        batches.VideoDataset(recs, folder, tok, cfg)
    ds = batches.VideoDataset(recs, folder, tok, cfg, on_error="skip")
    assert ds.kept == [2] and ds.skipped["missing_video"] == 2


# ---------------------------------------------------------------------------------------------
# Files of ours that are damaged: one line naming them

def test_damaged_checkpoint_files_name_themselves(run, tmp_path):
    ckpt = shutil.copytree(run[0] / "step_000002", tmp_path / "ckpt")
    weights = (ckpt / checkpoint.WEIGHTS).read_bytes()
    (ckpt / checkpoint.WEIGHTS).write_bytes(weights[:len(weights) // 2])
    with pytest.raises(ValueError, match=r"ckpt/model.safetensors: not a readable safetensors file, truncated"):
        checkpoint.from_checkpoint(ckpt)
    cfg = json.loads((ckpt / checkpoint.CONFIG).read_text())
    for change, says in (({"llm_width": 2**24, "llm_layers": 4096}, "parameters .* more than this machine's"),
                         ({"bogus": 1}, "field 'bogus' is not a D2VLMConfig field"),
                         ({"llm_heads": -4}, r"llm_heads=-4 is outside"), ({"lr_lora": "1e-3"}, "field 'lr_lora' must be of type float")):
        (ckpt / checkpoint.CONFIG).write_text(json.dumps({**cfg, **change}))
        with pytest.raises(ValueError, match=rf"ckpt/config.json: .*{says}"):
            checkpoint.read_config(ckpt)


def test_a_trainer_state_of_other_objects_is_refused_by_name(run, tmp_path):
    import fractions
    ckpt = shutil.copytree(run[0] / "step_000002", tmp_path / "ckpt")
    torch.save({"x": fractions.Fraction(1, 3)}, ckpt / checkpoint.STATE)
    with pytest.raises(ValueError, match=r"ckpt/trainer_state.pt: not a trainer state of plain tensors .*UnpicklingError"):
        train.resume_state(ckpt)
    torch.save({"step": 1}, ckpt / checkpoint.STATE)
    with pytest.raises(ValueError, match=r"trainer_state.pt: a trainer state holds step, epoch, micro"):
        train.resume_state(ckpt)


def test_a_damaged_probe_cache_is_started_again(synthetic, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(video.CACHE_ENV, str(tmp_path))
    clip = synthetic / "videos" / "train_0000.mp4"
    cache = tmp_path / "probe.json"
    for damaged, says in (("[]", "(list)"), ("{oops", "line 1: not valid JSON"), ('{"k": {"end": "x"}}', None)):
        cache.write_text(damaged)
        assert video.probe_all([clip], progress=False)[clip]["end"] == pytest.approx(35.75)
        kept = json.loads(cache.read_text())
        assert list(kept) == [next(k for k in kept if str(clip) in k)]  # written again, the bad entry dropped
        err = capsys.readouterr().err
        assert (f"{cache}: not a video-check cache" in err and says in err) if says else err == ""


# ---------------------------------------------------------------------------------------------
# Mid-run: a micro-batch that cannot be read is replaced

def _break_first_read(monkeypatch):
    """The first video read of the run fails, as a video broken since the pre-flight check would."""
    real, calls = video.sample_frames, []

    def broken_first(path, *a, **k):
        calls.append(path)
        if len(calls) == 1:
            raise ValueError(f"{path}: corrupt video, decoding failed after 0 frames (simulated)")
        return real(path, *a, **k)
    monkeypatch.setattr(video, "sample_frames", broken_first)


def test_a_first_micro_batch_that_cannot_be_read_is_replaced(synthetic, tmp_path, monkeypatch):
    _break_first_read(monkeypatch)
    run_dir = _train(synthetic, tmp_path, "first", "--max-steps", "2", "--set", "batch_size=1")
    rows = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines()]
    assert rows[-1]["summary"] and rows[-1]["steps"] == 2
    assert [(r.get("skipped_samples"), r.get("replaced_batches")) for r in rows[:-1]] == [(1, 1), (1, 1)]


def test_fpo_reference_log_probs_go_on_past_a_video_that_cannot_be_read(synthetic, run, tmp_path, monkeypatch, capsys):
    _break_first_read(monkeypatch)
    train.main(["--stage", "fpo", "--init", str(run[0] / "step_000002"), "--ref", "sft", "--data",
                str(synthetic / "tvg.json"), "--videos", str(synthetic / "videos"), "--out", str(tmp_path),
                "--name", "f", "--workers", "0", "--max-steps", "1", "--set", "batch_size=2"])
    err = capsys.readouterr().err
    assert "1 pairs have no reference log-probs (their video failed to read)" in err and "(simulated)" in err
    assert checkpoint.damaged(tmp_path / "f" / "fpo" / "step_000001") is None


def test_an_epoch_that_cannot_be_read_stops_the_run():
    stream = iter([{"failed": [f"v{i}.mp4: corrupt"]} for i in range(3)])
    with pytest.raises(SystemExit, match=r"3 micro-batches in a row could not be read.*first: v0.mp4: corrupt"):
        batches.readable(stream, 3)
    ok = {"input_ids": torch.zeros(1), "failed": ["v.mp4: corrupt"]}
    assert batches.readable(iter([{"failed": ["a"]}, ok]), 3) == ({"input_ids": ok["input_ids"]}, ["a", "v.mp4: corrupt"], 1)


# ---------------------------------------------------------------------------------------------
# Scorers linear on every answer shape

def _dense(n, rng):
    words = ["red", "green", "blue", "circle", "square", "grows", "moves", "blinks", "left", "spins"]
    return "\n".join(f"{i * 0.25:.2f} - {i * 0.25 + 0.2:.2f} seconds, a {' '.join(rng.choice(words, 3))} {i}."
                     for i in range(n))


def _best_of_3(f, x):
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        f(x)
        best = min(best, time.perf_counter() - t)
    return best


def test_dense_captions_parse_in_linear_time_as_the_official_loop_cuts():
    rng = np.random.default_rng(0)
    small, large = _dense(1000, rng), _dense(8000, rng)
    assert len(dvc_format(large)[0]) == 8000
    t_small, t_large = _best_of_3(dvc_format, small), _best_of_3(dvc_format, large)
    assert t_large < 25 * t_small + 0.02, (t_small, t_large)  # 8x the segments: about 11x; the official loop 64x
    r = random.Random(1)  # the official loop's cuts, on text with the characters \d and \s also take
    alphabet = list("0123456789- \n.") + [" a red", " seconds", "\u0663", "\u2003", "\t"]
    for _ in range(20000):
        text = "".join(r.choice(alphabet) for _ in range(r.randint(1, 30)))
        pairs = [m.group(0) for m in PAIR.finditer(text)]
        official = text
        for p in pairs:
            official = official.replace(p, "\n")
        assert cut_pairs(text, pairs) == official, repr(text)


def test_a_dense_caption_answer_of_4000_segments_is_scored():
    """The fuzz case of the stall: one DVC answer of 4,000 distinct segments (about 200 KB) is
    parsed, cut to the official 1,000 and paired in well under a second (the caption metrics and
    MiniLM, stubbed here, are bench.py's to time)."""
    rec = {"task": "dvc", "source": "s", "video": "v.mp4", "a": _dense(4000, np.random.default_rng(0)),
           "tgt": [[0.0, 0.2], [0.25, 0.45]], "g": ["a red circle grows", "a blue square moves"]}
    embed = HashEmbedder()
    t = time.perf_counter()
    out = score_dvc([rec], PlainCaptionScorers(embed))
    assert time.perf_counter() - t < 1.0
    assert out["Failed"] == 0 and 0 < out["F1"] < 1


# ---------------------------------------------------------------------------------------------
# One line means one line

def test_a_resume_that_cannot_be_exact_stops_before_any_weight_is_loaded(synthetic, run, tmp_path, monkeypatch):
    shutil.copytree(run[0].parent, tmp_path / "r")
    _no_weights(monkeypatch)
    with pytest.raises(SystemExit, match=r"step_000002: was run with total=3, this run has 5; an exact resume"):
        _train(synthetic, tmp_path, "r", "--max-steps", "5", "--set", "batch_size=2", "--resume")


def test_an_error_after_the_model_is_built_is_still_one_line(synthetic, run, tmp_path):
    """A checkpoint whose adapter is truncated fails after the model is built (where peft warns):
    stderr is the one error line, with no library warning or progress bar before it."""
    ckpt = shutil.copytree(run[0] / "step_000002", tmp_path / "ckpt")
    adapter = ckpt / checkpoint.ADAPTER / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:100])
    r = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--ckpt", str(ckpt), "--data", str(run[1]),
                        "--videos", str(synthetic / "videos")],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=tmp_path)
    lines = r.stderr.splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith(f"error: {adapter}: not a readable safetensors file, truncated or damaged (")
