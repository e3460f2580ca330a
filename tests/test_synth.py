"""synth.py: each perturbation's invariants, seed determinism, the pairs file, and the counts."""
import json
import re

import numpy as np
import pytest

import data
import event_videos
import synth
from data import EVI, EVI_END


def ev(task, answer, spans, duration=60.0):
    """An evidence-format record: the answer template with one <evi> per span."""
    return {"task": task, "source": "test", "video": "v.mp4", "duration": duration, "prompt": "Q?",
            "response": EVI * len(spans) + EVI_END + answer, "spans": [list(s) for s in spans],
            "frames": data.to_frames(spans), "question_spans": [], "question_frames": []}


DVC = ev("dvc", f"{EVI} seconds, a red square appears.\n{EVI} seconds, a blue circle moves left.\n"
                f"{EVI} seconds, a green triangle grows.", [(2, 6), (10, 15), (30, 34)])
TAL = ev("tal", f"The action happens in {EVI}, {EVI} and {EVI} seconds.", [(1, 4), (12, 18), (40, 44)])
TVG = ev("tvg", f"The event happens in {EVI} seconds.", [(20, 26)])
MCQ = ev("rar", "(B) the man opens a door", [])
BORROWED = [f"{EVI} seconds, a yellow square blinks."]


def stage2(resp):
    return resp.split(EVI_END, 1)[1]


def kinds_of(rec):
    rng = np.random.default_rng(0)
    return {k for k in synth.KINDS if synth.perturb(rec, k, rng, borrowed=BORROWED) is not None}


def test_which_kinds_apply():
    assert kinds_of(DVC) == set(synth.KINDS)
    assert kinds_of(TAL) == set(synth.KINDS) - {"tamper"}  # no key word in "The action happens in ..."
    assert kinds_of(TVG) == {"shift", "repeat"}           # one event, not a multi-event task
    assert kinds_of(MCQ) == {"repeat", "tamper"}        # man, opens, door


@pytest.mark.parametrize("rec", [DVC, TAL, TVG], ids=["dvc", "tal", "tvg"])
@pytest.mark.parametrize("seed", range(5))
def test_shift_moves_one_span_only(rec, seed):
    r = synth.perturb(rec, "shift", np.random.default_rng(seed))
    assert r["response"] == rec["response"]  # text unchanged
    moved = [i for i, (a, b) in enumerate(zip(rec["spans"], r["spans"])) if a != b]
    assert len(moved) == 1
    (s, e), (ns, ne) = rec["spans"][moved[0]], r["spans"][moved[0]]
    assert ne - ns == pytest.approx(e - s, abs=0.02) and abs(ns - s) >= 1.0  # same length, moved >= 1 s
    assert 0 <= ns and ne <= rec["duration"]
    assert r["evi_spans"] == r["spans"] * 2


@pytest.mark.parametrize("rec", [DVC, TAL], ids=["dvc", "tal"])
@pytest.mark.parametrize("seed", range(5))
def test_insert_adds_a_non_overlapping_event(rec, seed):
    r = synth.perturb(rec, "insert", np.random.default_rng(seed), borrowed=BORROWED)
    K = len(rec["spans"])
    assert len(r["spans"]) == K + 1 and r["response"].count(EVI) == 2 * (K + 1)
    new = [s for s in r["spans"] if s not in rec["spans"]]
    assert len(new) == 1
    ns, ne = new[0]
    assert all(ne < s or ns > e for s, e in rec["spans"])  # no overlap
    assert r["spans"] == sorted(r["spans"])                 # in time order, as the answer is
    if rec is DVC:
        assert BORROWED[0] in stage2(r["response"]).split("\n")


@pytest.mark.parametrize("rec", [DVC, TAL], ids=["dvc", "tal"])
@pytest.mark.parametrize("seed", range(5))
def test_delete_removes_exactly_one_event(rec, seed):
    r = synth.perturb(rec, "delete", np.random.default_rng(seed))
    K = len(rec["spans"])
    assert len(r["spans"]) == K - 1 and r["response"].count(EVI) == 2 * (K - 1)
    gone = [s for s in rec["spans"] if s not in r["spans"]]
    assert len(gone) == 1
    if rec is DVC:  # the deleted event's line went with it, the others stay word for word
        lines = stage2(rec["response"]).split("\n")
        assert stage2(r["response"]).split("\n") == [x for i, x in enumerate(lines) if rec["spans"][i] != gone[0]]
    else:
        assert re.fullmatch(rf"The action happens in {EVI}(, {EVI}| and {EVI}) seconds\.", stage2(r["response"]))


@pytest.mark.parametrize("rec", [DVC, TAL], ids=["dvc", "tal"])
@pytest.mark.parametrize("seed", range(5))
def test_merge_fuses_two_neighbours(rec, seed):
    r = synth.perturb(rec, "merge", np.random.default_rng(seed))
    K = len(rec["spans"])
    assert len(r["spans"]) == K - 1
    merged = [s for s in r["spans"] if s not in rec["spans"]]
    assert len(merged) == 1
    k = r["spans"].index(merged[0])
    (a, b), (c, d) = rec["spans"][k], rec["spans"][k + 1]
    assert merged[0] == [min(a, c), max(b, d)]  # covers both neighbours


@pytest.mark.parametrize("seed", range(5))
def test_tamper_changes_one_key_word(seed):
    r = synth.perturb(DVC, "tamper", np.random.default_rng(seed))
    assert r["spans"] == DVC["spans"]
    before, after = DVC["response"].split(" "), r["response"].split(" ")
    assert len(before) == len(after)
    diff = [(a, b) for a, b in zip(before, after) if a != b]
    assert len(diff) == 1
    a, b = (re.sub(r"\W", "", w).lower() for w in diff[0])
    assert any(a in ws and b in ws for ws in synth.KEY_WORDS.values())


def test_tamper_uses_the_dataset_vocabulary():
    vocab = synth.vocabulary([DVC, TAL])
    assert vocab["colour"] == ["red", "green", "blue"] and vocab["object"] == ["square", "circle", "triangle"]
    for seed in range(10):
        r = synth.perturb(DVC, "tamper", np.random.default_rng(seed), vocab)
        words = set(re.findall(r"[a-z]+", r["response"]))
        assert words <= set(re.findall(r"[a-z]+", DVC["response"]))  # only words the data already has


@pytest.mark.parametrize("rec", [DVC, TVG, MCQ], ids=["dvc", "tvg", "mcq"])
@pytest.mark.parametrize("seed", range(3))
def test_repeat_duplicates_one_line(rec, seed):
    r = synth.perturb(rec, "repeat", np.random.default_rng(seed))
    assert r["spans"] == rec["spans"]
    old, new = stage2(rec["response"]), stage2(r["response"])
    sep = "\n" if "\n" in old else " "  # lines, or the sentences of a one-line answer
    a = old.split("\n") if sep == "\n" else re.split(r"(?<=[.!?])\s+", old)
    k = next(i for i in range(len(a)) if sep.join(a[:i + 1] + [a[i]] + a[i + 1:]) == new)
    # the repeated piece's <evi> refer to the same events: one span per <evi>, stage 1 first
    K = len(rec["spans"])
    assert len(r["evi_spans"]) == r["response"].count(EVI) and r["evi_spans"][:K] == rec["spans"]
    n_before = sum(x.count(EVI) for x in a[:k + 1])
    dup = rec["spans"][n_before - a[k].count(EVI):n_before]
    assert r["evi_spans"][K:] == rec["spans"][:n_before] + dup + rec["spans"][n_before:]


def test_make_pairs_is_seeded_counts_and_roundtrips(tmp_path):
    recs = [DVC, TAL, TVG, MCQ, ev("rar", "", [])]  # the last: no kind applies
    a, b, c = synth.make_pairs(recs, seed=1), synth.make_pairs(recs, seed=1), synth.make_pairs(recs, seed=2)
    assert [(p["kind"], p["rejected"]) for p in a] == [(p["kind"], p["rejected"]) for p in b]
    assert [(p["kind"], p["rejected"]) for p in a] != [(p["kind"], p["rejected"]) for p in c]
    assert len(a) == 4 and a.unusable == 1 and sum(a.counts.values()) == 4
    assert all(p["kind"] in ("repeat", "tamper") for p in a if p["task"] == "rar")
    two = synth.make_pairs(recs, seed=1, per_sample=2)
    dvc_kinds = [p["kind"] for p in two if p["task"] == "dvc"]
    assert len(dvc_kinds) == 2 and len(set(dvc_kinds)) == 2
    synth.save_pairs(a, tmp_path / "pairs.json")
    back = synth.load_pairs(tmp_path / "pairs.json", fps=2.0)
    assert [p["rejected"] for p in back] == [p["rejected"] for p in a]
    assert back[0]["frames"] == data.to_frames(a[0]["spans"], 2.0)
    raw = json.loads((tmp_path / "pairs.json").read_text())
    raw[1]["rejected"]["evi_spans"] = raw[1]["rejected"]["evi_spans"][:-1]
    (tmp_path / "bad.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=r"bad.json: pair 1: field 'rejected'"):
        synth.load_pairs(tmp_path / "bad.json")


def test_cli_reports_kinds(synthetic, tmp_path, capsys):
    n = len(data.load_records(synthetic / "train.json"))
    synth.main(["--data", str(synthetic / "train.json"), "--out", str(tmp_path / "pairs.json")])
    err = capsys.readouterr().err
    assert re.search(rf"pairs.json: {n} pairs from {n} records \(shift \d+, insert \d+, delete \d+, merge \d+, "
                     r"tamper \d+, repeat \d+\); no kind applies to 0 records", err), err
    assert len(synth.load_pairs(tmp_path / "pairs.json")) == n > 6 * len(event_videos.SYN_TASKS)
