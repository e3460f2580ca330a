"""data.py: annotation reading and validation, evidence conversion, render round trip, and
VideoDataset's counts and skips."""
import dataclasses
import json
import math

import numpy as np
import pytest
import torch

import batches
import config
import data
import model
from data import EVI, EVI_END


# ---------------------------------------------------------------------------------------------
# Conversion of hand-written records, E.T.Instruct-164K (txt and vid) and E.T.Bench (txt and vid)

Q_TVG = "Watch the video carefully and find a visual event described by the sentence: 'a man opens a door'."


def instruct(task, human, gpt, **kw):
    return {"task": task, "source": "src_" + task, "video": f"{task}/v.mp4", "duration": 60.0,
            "conversations": [{"from": "human", "value": "<image>\n" + human}, {"from": "gpt", "value": gpt}], **kw}


# (task, human, gpt txt, gpt vid, tgt, expected response, expected spans)
INSTRUCT = [
    ("tvg", Q_TVG, "The event happens in 3.2 - 9.8 seconds.", "The event happens in <vid> - <vid> seconds.",
     [3.2, 9.8], f"{EVI}{EVI_END}The event happens in {EVI} seconds.", [[3.2, 9.8]]),
    ("epm", "When did I last see my keys?", "The event happens in 40.0 - 52.5 seconds.",
     "The event happens in <vid> - <vid> seconds.", [40.0, 52.5],
     f"{EVI}{EVI_END}The event happens in {EVI} seconds.", [[40.0, 52.5]]),
    ("tal", "Find all the moments of 'jumping'.", "The action happens in 1.0 - 3.0, 5.0 - 8.0, and 10.0 - 12.5 seconds.",
     "The action happens in <vid> - <vid>, <vid> - <vid>, and <vid> - <vid> seconds.", [1.0, 3.0, 5.0, 8.0, 10.0, 12.5],
     f"{EVI * 3}{EVI_END}The action happens in {EVI}, {EVI}, and {EVI} seconds.", [[1.0, 3.0], [5.0, 8.0], [10.0, 12.5]]),
    ("evs", "Summarize the video.", "The key segments are 0.0 - 4.0, 10.0 - 14.0 seconds.",
     "The key segments are <vid> - <vid>, <vid> - <vid> seconds.", [0.0, 4.0, 10.0, 14.0],
     f"{EVI * 2}{EVI_END}The key segments are {EVI}, {EVI} seconds.", [[0.0, 4.0], [10.0, 14.0]]),
    ("vhd", "Find the highlights for 'a dog runs'.", "The highlight moments are at 4.0, 6.5 and 10.0 seconds.",
     "The highlight moments are at <vid>, <vid> and <vid> seconds.", [4.0, 6.5, 10.0],
     f"{EVI * 3}{EVI_END}The highlight moments are at {EVI}, {EVI} and {EVI} seconds.",
     [[4.0, 4.0], [6.5, 6.5], [10.0, 10.0]]),
    ("dvc", "Describe all the events.", "0.0 - 5.0 seconds, a man cracks eggs.\n5.5 - 12.0 seconds, he whisks them.",
     "<vid> - <vid> seconds, a man cracks eggs.\n<vid> - <vid> seconds, he whisks them.", [0.0, 5.0, 5.5, 12.0],
     f"{EVI * 2}{EVI_END}{EVI} seconds, a man cracks eggs.\n{EVI} seconds, he whisks them.", [[0.0, 5.0], [5.5, 12.0]]),
    ("slc", "Localize the steps.", "2.0 - 9.0 seconds, add salt. 12.0 - 15.25 seconds, stir.",
     "<vid> - <vid> seconds, add salt. <vid> - <vid> seconds, stir.", [2.0, 9.0, 12.0, 15.25],
     f"{EVI * 2}{EVI_END}{EVI} seconds, add salt. {EVI} seconds, stir.", [[2.0, 9.0], [12.0, 15.25]]),
]


@pytest.mark.parametrize("task,human,gpt,gpt_vid,tgt,response,spans", INSTRUCT, ids=[c[0] for c in INSTRUCT])
def test_instruct_txt_and_vid_convert_to_the_same_evidence(task, human, gpt, gpt_vid, tgt, response, spans):
    ev = data.to_evidence(instruct(task, human, gpt))
    assert ev["response"] == response
    assert ev["spans"] == spans
    assert ev["frames"] == np.rint(np.array(spans)).astype(int).tolist()  # to the nearest frame, a tie to the even one
    assert ev["prompt"] == human and ev["question_spans"] == [] and ev["task"] == task
    assert ev["response"].count(EVI) == 2 * len(spans)
    assert data.to_evidence(instruct(task, human, gpt_vid, tgt=tgt)) == ev


def test_question_timestamps_become_question_evidence():
    txt = instruct("tem", "What happens after 2.5 - 4.0 seconds?", "It happens in 5.0 to 7.5 seconds.")
    vid = instruct("tem", "What happens after <vid> - <vid> seconds?", "It happens in <vid> to <vid> seconds.",
                   src=[2.5, 4.0], tgt=[5.0, 7.5])
    for rec in (txt, vid):
        ev = data.to_evidence(rec)
        assert ev["prompt"] == f"What happens after {EVI} seconds?"
        assert ev["question_spans"] == [[2.5, 4.0]] and ev["question_frames"] == [[2, 4]]  # 2.5: a tie, to even
        assert ev["response"] == f"{EVI}{EVI_END}It happens in {EVI} seconds." and ev["spans"] == [[5.0, 7.5]]
        assert ev["frames"] == [[5, 8]]  # 7.5: a tie, to the even frame, as the release's round() and torch.round


def test_timestamp_phrasings_in_text():
    template, spans = data.extract_times("from 3 to 8s, then 10-12 seconds, 4 s to 6 s; "
                                         "at 1, 2 and 30.5 seconds; 4 steps, 2 - 3.")
    assert template == f"from {EVI}s, then {EVI} seconds, {EVI} s; at {EVI}, {EVI} and {EVI} seconds; 4 steps, {EVI}."
    assert spans == [[3, 8], [10, 12], [4, 6], [1, 1], [2, 2], [30.5, 30.5], [2, 3]]
    # numbers that are no timestamps stay text
    assert data.extract_times("He adds 3 eggs and 2 cups of flour.") == ("He adds 3 eggs and 2 cups of flour.", [])


def bench(task, q="Answer the question.", **kw):
    return {"version": 1.0, "idx": 0, "task": task, "source": "src_" + task, "video": f"{task}/v.mp4",
            "duration": 60.0, "q": q, **kw}


BENCH = [
    (bench("tvg", Q_TVG, tgt=[3.1, 9.8]), f"{EVI}{EVI_END}The event happens in {EVI} seconds.", [[3.1, 9.8]]),
    (bench("epm", tgt=[40.0, 52.5]), f"{EVI}{EVI_END}The event happens in {EVI} seconds.", [[40.0, 52.5]]),
    (bench("tal", tgt=[[5.0, 9.0], [30.0, 41.2]]), f"{EVI * 2}{EVI_END}{EVI}, {EVI} seconds.", [[5, 9], [30, 41.2]]),
    (bench("evs", tgt=[[0.0, 12.0]]), f"{EVI}{EVI_END}{EVI} seconds.", [[0, 12]]),
    (bench("tem", tgt=[[22.0, 30.5], [41.0, 44.0]]), f"{EVI * 2}{EVI_END}{EVI}, {EVI} seconds.", [[22, 30.5], [41, 44]]),
    (bench("vhd", tgt=[[10, 14], [20, 26]]), f"{EVI}{EVI_END}The highlight is at {EVI} seconds.", [[23.0, 23.0]]),
    (bench("vhd", tgt=[[[10, 14], [20, 26]], [[12, 19]]]), f"{EVI}{EVI_END}The highlight is at {EVI} seconds.",
     [[15.5, 15.5]]),
    (bench("dvc", tgt=[[10, 20], [25, 40]], g=["crack eggs", "whisk"]),
     f"{EVI * 2}{EVI_END}{EVI} seconds, crack eggs\n{EVI} seconds, whisk", [[10, 20], [25, 40]]),
    (bench("slc", tgt=[[3, 9]], g=["add salt"]), f"{EVI}{EVI_END}{EVI} seconds, add salt", [[3, 9]]),
    (bench("rar", p=2, o=["opt A", "opt B", "opt C", "opt D"]), f"{EVI_END}(C) opt C", []),
    (bench("eca", p=1, o=[[0.0, 4.0], [4.0, 9.5], [9.5, 13.0], [13.0, 20.0]]), f"{EVI_END}(B) 4.0 - 9.5", []),
    (bench("rvq", p=4, o=["a", "b", "c", "d", "e"]), f"{EVI_END}(E) e", []),
    (bench("gvq", p=3, o=["a", "b", "c", "d"], tgt=[12.0, 18.0]),
     f"{EVI}{EVI_END}(D) d. The evidence is in {EVI} seconds.", [[12.0, 18.0]]),
]


@pytest.mark.parametrize("rec,response,spans", BENCH, ids=[f"{r['task']}{i}" for i, (r, _, _) in enumerate(BENCH)])
def test_bench_records_convert(rec, response, spans):
    ev = data.to_evidence(rec)
    assert ev["response"] == response
    assert ev["spans"] == [[float(s), float(e)] for s, e in spans]
    assert ev["prompt"] == rec["q"]


def test_bench_vid_question_uses_src():
    txt = bench("rar", "What happens during 5.0 - 8.0 seconds?", p=0, o=list("abcd"))
    vid = bench("rar", "What happens during <vid> - <vid> seconds?", p=0, o=list("abcd"), src=[5.0, 8.0])
    assert data.to_evidence(txt) == data.to_evidence(vid)
    assert data.to_evidence(vid)["question_spans"] == [[5.0, 8.0]]


# ---------------------------------------------------------------------------------------------
# Render round trip


# every <evi> renders as "s - e", so a single time comes back as a zero-length span (which the
# D2VLM VHD rule needs: it reads the midpoint of an "s - e" span)
CANONICAL = {"vhd": "The highlight moments are at 4.0 - 4.0, 6.5 - 6.5 and 10.0 - 10.0 seconds."}


@pytest.mark.parametrize("task,human,gpt,gpt_vid,tgt,response,spans", INSTRUCT, ids=[c[0] for c in INSTRUCT])
def test_render_reproduces_the_original_answer(task, human, gpt, gpt_vid, tgt, response, spans):
    for rec in (instruct(task, human, gpt), instruct(task, human, gpt_vid, tgt=tgt)):
        ev = data.to_evidence(rec)
        text = data.render(ev["response"], ev["spans"] + ev["spans"])
        assert data.answer_text(text) == CANONICAL.get(task, gpt)
        # the evidence part lists the same spans, parseable as "s - e, s - e"
        head = text.split(EVI_END)[0]
        assert head == ", ".join("{} - {}".format(*map(data.fmt_time, s)) for s in spans)
        # and converting the rendered answer again is a fixed point
        again = data.to_evidence(instruct(task, human, data.answer_text(text)))
        assert again["response"] == ev["response"] and again["spans"] == ev["spans"]


def test_render_canonicalises_other_phrasings():
    ev = data.to_evidence(instruct("tvg", Q_TVG, "It happens from 3 to 8.5 seconds."))
    assert data.render(ev["response"], ev["spans"] * 2) == f"3.0 - 8.5{EVI_END}It happens from 3.0 - 8.5 seconds."
    with pytest.raises(ValueError, match="1 <evi> tokens but 2 spans"):
        data.render(f"{EVI}", [[1, 2], [3, 4]])


# ---------------------------------------------------------------------------------------------
# Bad records: one clear error naming file, index and field; or counted skips

GOOD = instruct("tvg", Q_TVG, "The event happens in 3.2 - 9.8 seconds.")


def _with(**kw):
    return {**GOOD, **kw}


BAD = [
    ({k: v for k, v in GOOD.items() if k != "task"}, "task", "missing"),
    (_with(duration=-3), "duration", "must be positive"),
    (_with(duration="long"), "duration", "finite number"),
    (_with(conversations=[{"from": "human", "value": "hi"}]), "conversations", "one human turn followed by one gpt"),
    (instruct("tvg", Q_TVG, "The event happens in 9.8 - 3.2 seconds."), "conversations", "not 0 <= start <= end"),
    (instruct("tvg", Q_TVG, "The event happens in 3.2 - 75.0 seconds."), "conversations", "duration (60 s)"),
    (instruct("tvg", Q_TVG, "The event happens in <vid> - <vid> seconds.", tgt=[3.0]), "tgt", "2 <vid> placeholders but 1"),
    (instruct("tvg", Q_TVG, "In <vid> - <vid> seconds.", tgt=[3.0, float("nan")]), "tgt", "finite number"),
    (instruct("tvg", "After <vid> - <vid>?", "In 3 - 4 seconds.", src=[1.0]), "src", "2 <vid> placeholders but 1"),
    (instruct("tvg", Q_TVG, f"In {EVI} 3 - 4 seconds."), "conversations", "reserved token"),
    (bench("tvg", tgt=[[3.0, 4.0]]), "tgt", "expected a span [start, end], got [[3.0, 4.0]]"),
    (bench("tvg", tgt=[3.0]), "tgt", "expected a span"),
    (bench("tal", tgt=[3.0, 4.0]), "tgt", "expected a span"),
    (bench("tal", tgt=[]), "tgt", "non-empty list of spans"),
    (bench("dvc", tgt=[[1, 2], [3, 4]], g=["only one"]), "g", "expected 2 captions"),
    (bench("rar", p=7, o=list("abcd")), "p", "option index in 0..3"),
    (bench("rar", p=0, o=list("abc")), "o", "4 or 5 options"),
    (bench("xyz", tgt=[1, 2]), "task", "unknown E.T.Bench task"),
    (bench("tvg", q="", tgt=[1, 2]), "q", "non-empty string"),
    ({"task": "tvg", "source": "s", "video": "v.mp4", "duration": 5.0}, "conversations", "neither"),
]


@pytest.mark.parametrize("rec,field,reason", BAD, ids=[f"{f}-{i}" for i, (_, f, _) in enumerate(BAD)])
def test_bad_record_names_file_index_and_field(tmp_path, rec, field, reason):
    path = tmp_path / "ann.json"
    path.write_text(json.dumps([GOOD, GOOD, rec]))
    with pytest.raises(ValueError) as err:
        data.load_records(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: record 2: field '{field}':"), msg
    assert reason in msg and "\n" not in msg


def test_skip_mode_counts_and_reports(tmp_path, capsys):
    path = tmp_path / "ann.jsonl"
    bad = [BAD[1][0], BAD[5][0]]
    path.write_text("\n".join(json.dumps(r) for r in [GOOD, bad[0], GOOD, bad[1]]) + "\n")
    recs = data.load_records(path, on_error="skip")
    assert len(recs) == 2 and recs == [GOOD, GOOD]
    assert len(recs.skipped) == 2 and recs.skipped[0].startswith("1: field 'duration'")
    assert recs.skipped[1].startswith("3: field 'conversations'")
    assert f"{path}: skipped 2 of 4 records" in capsys.readouterr().err


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.json: annotation file not found"):
        data.load_records(tmp_path / "missing.json")
    (tmp_path / "a.json").write_text('[{"task": ')
    with pytest.raises(ValueError, match=r"a.json: line 1: not valid JSON"):
        data.load_records(tmp_path / "a.json")
    (tmp_path / "b.json").write_text('{"task": "tvg"}')
    with pytest.raises(ValueError, match="b.json: expected a JSON list of records, got dict"):
        data.load_records(tmp_path / "b.json")
    (tmp_path / "c.jsonl").write_text(json.dumps(GOOD) + "\n{oops\n")
    with pytest.raises(ValueError, match="c.jsonl: line 2: not valid JSON"):
        data.load_records(tmp_path / "c.jsonl")
    with pytest.raises(ValueError, match="on_error"):
        data.load_records(tmp_path / "c.jsonl", on_error="ignore")


# ---------------------------------------------------------------------------------------------
# VideoDataset

def test_dataset_counts_and_skips(synthetic, tmp_path, capsys):
    cfg = config.PRESETS["tiny"]
    tok = model.build_tiny_tokenizer(cfg.tiny_vocab)
    ds = batches.VideoDataset(synthetic / "mixed.json", synthetic / "videos", tok, cfg)
    assert len(ds) == 12 and ds.skipped == {"invalid": 0, "missing_video": 0, "bad_video": 0, "bad_duration": 0, "too_long": 0}
    s = ds[0]
    assert s["frames"].dtype == torch.uint8 and s["frames"].shape[1:] == (3, cfg.image_size, cfg.image_size)
    assert s["frames"].shape[0] == math.ceil(s["evidence"]["duration"])
    # dvc answers are longer than tvg ones: a max_len between the two keeps only the tvg records
    lengths = []
    for ev in ds.items:
        n = len(tok(batches.CHAT[0].format(system=cfg.system_prompt, prompt=ev["prompt"]) + batches.CHAT[1].format(
            response=ev["response"]), add_special_tokens=False)["input_ids"])
        lengths.append(n - 1 + math.ceil(ev["duration"]))
    tvg = [n for n, ev in zip(lengths, ds.items) if ev["task"] == "tvg"]
    cut = max(tvg)
    short = batches.VideoDataset(synthetic / "mixed.json", synthetic / "videos", tok, dataclasses.replace(cfg, max_len=cut))
    assert len(short) == sum(n <= cut for n in lengths) and short.skipped["too_long"] == sum(n > cut for n in lengths)
    assert short.skipped["too_long"] > 0 and "longer than max_len" in capsys.readouterr().err
    # a record whose video file is missing: one error naming the record, or a counted skip
    recs = json.loads((synthetic / "tvg.json").read_text())
    recs[2]["video"] = "nope.mp4"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(recs))
    with pytest.raises(FileNotFoundError, match=r"record 2: field 'video': .*nope.mp4 not found"):
        batches.VideoDataset(bad, synthetic / "videos", tok, cfg)
    assert batches.VideoDataset(bad, synthetic / "videos", tok, cfg, on_error="skip").skipped["missing_video"] == 1


def test_the_release_training_data_filters(synthetic):
    """min_duration / max_duration on the record's duration, max_answer_words on the answer split on
    spaces, each counted; 0 leaves everything in."""
    import dataclasses

    import config
    recs = data.load_records(synthetic / "train.json")
    cfg = config.PRESETS["tiny"]
    assert len(batches.filter_records(recs, cfg)[0]) == len(recs)
    durations = sorted({r["duration"] for r in recs})
    words = [len(r["conversations"][1]["value"].split(" ")) for r in recs]
    cut = sorted(words)[len(words) // 2]
    kept, n = batches.filter_records(recs, dataclasses.replace(cfg, min_duration=durations[1], max_answer_words=cut))
    short = sum(r["duration"] < durations[1] for r in recs)
    wordy = sum(w > cut for r, w in zip(recs, words) if r["duration"] >= durations[1])
    assert n == {"short": short, "long": 0, "wordy": wordy} and len(kept) == len(recs) - short - wordy > 0
    assert kept.path == recs.path
    _, n = batches.filter_records(recs, dataclasses.replace(cfg, max_duration=durations[-2]))
    assert n["long"] == sum(r["duration"] > durations[-2] for r in recs) > 0


def test_qformer_instruction_as_the_release_tokenizes_it():
    """qformer_special_tokens (the d2vlm-3.8b preset): [CLS] + the last tokens that fit + [SEP], what
    the release's call (truncation on the left, max_length) gives; off: the plain tokens, left-truncated."""
    import dataclasses

    import config
    import layouts
    tok = layouts.bert_base_uncased_tokenizer(truncation_side="left")
    q = "Find when the red square moves to the left of the blue circle"
    s = {"evidence": {"prompt": q, "response": "", "frames": [], "question_frames": []},
         "frames": torch.zeros(1, 3, 4, 4, dtype=torch.uint8)}
    assert config.PRESETS["d2vlm-3.8b"].qformer_special_tokens and not config.PRESETS["tiny"].qformer_special_tokens
    for n in (8, 256):
        cfg = dataclasses.replace(config.PRESETS["d2vlm-3.8b"], qformer_max_text=n)
        ids = batches.collate([s], tok, tok, cfg, with_response=False)["qformer_ids"][0].tolist()
        assert ids == tok(q, truncation=True, max_length=n)["input_ids"] and ids[0] == 101 and ids[-1] == 102
    plain = dataclasses.replace(config.PRESETS["d2vlm-3.8b"], qformer_max_text=6, qformer_special_tokens=False)
    assert batches.collate([s], tok, tok, plain, with_response=False)["qformer_ids"][0].tolist() == \
        tok(q, add_special_tokens=False)["input_ids"][-6:]


def test_the_prompt_is_tokenized_as_the_release_does_when_asked():
    """prompt_as_released: the release's tokenize() (utils/tokenization.py:14-28), written again here:
    split at the video, each piece with the tokenizer's defaults, the first piece's <s> kept and the
    later pieces' dropped. On Phi-3's layout that is a leading <s> and a word-boundary piece after
    the video; without the switch, the chat template as one text."""
    import layouts
    tok = model.add_special_tokens(layouts.phi3_tokenizer())
    plain_cfg = config.PRESETS["tiny"]
    cfg = dataclasses.replace(plain_cfg, prompt_as_released=True)
    prompt = "You are given a video. When does the red square appear?"
    text = batches.CHAT[0].format(system=cfg.system_prompt, prompt=prompt)
    video = tok.convert_tokens_to_ids(data.VIDEO)
    chunks = [tok(c).input_ids for c in text.split(data.VIDEO)]
    offset = 1 if chunks[0][0] == tok.bos_token_id else 0
    want = chunks[0][:offset] + [x for k, c in enumerate(chunks) for x in ([video] if k else []) + c[offset:]]
    got = batches.prompt_ids(tok, cfg, [prompt])[0]
    plain = batches.prompt_ids(tok, plain_cfg, [prompt])[0]
    assert got == want and got[0] == 1 and plain[0] != 1  # Phi-3's <s> is id 1
    assert len(got) == len(plain) + 2  # the <s>, and the word-boundary piece the release's new text starts with
    assert plain == tok(text, add_special_tokens=False).input_ids
