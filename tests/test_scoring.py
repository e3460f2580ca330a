"""The scorers (the scoring package: rules, etbench, d2vlm, captions, charades_youcook2): each
task scored on hand-written responses whose official scores follow from the rules (docs/scoring-rules.md),
the tricky parses, the release's reproduced bugs, and a fuzz run that must never crash."""
import json
import math
import random

import numpy as np
import pytest
import torch

from data import CAPTION_TASKS, ONE_SPAN_TASKS, OPTION_TASKS
from scoring import etbench
from scoring.captions import CAPTION_KEYS, CaptionScorers, dvc_format, dvc_format_d2vlm, score_dvc
from scoring.charades_youcook2 import charades_records, chased_dp, score_charades, score_youcook2
from scoring.d2vlm import d2vlm_evs, d2vlm_mcq, d2vlm_tal, d2vlm_tvg, d2vlm_vhd, tvg_format_d2vlm
from scoring.etbench import (HEADLINE, _safe_spans, load_predictions, score_etbench, score_evs, score_gvq, score_mcq,
                             score_tal, score_tvg, score_vhd, summary, table)
from scoring.rules import (THRESHOLDS, Embedder, Unparsable, at_thresholds, letter_choice, letter_map, lone_letter,
                           random_caption, temporal_iou, tvg_format)


@pytest.fixture(scope="module")
def embed():
    """One MiniLM embedder for the module (the model loads on first use)."""
    return Embedder()


@pytest.fixture(scope="module")
def scorers(embed):
    """One Java METEOR process for the module: only the tests that score captions ask for it."""
    return CaptionScorers(embed)


def rec(task, a, **kw):
    return {"task": task, "source": kw.pop("source", "src"), "video": kw.pop("video", "v.mp4"), "a": a, **kw}


# ---------------------------------------------------------------------------------------------
# Shared rules and parsers

@pytest.mark.parametrize("text,spans", [
    ("The event happens in 10.0 - 20.0 seconds.", [[10.0, 20.0]]),
    ("starts at 12 and ends at 18.", None),                 # one sentence ('.' does not split): one number
    ("starts at 12\nends at 18", [[12.0, 18.0]]),           # two sentences, a number each
    ("from 5 to9", None),                                   # " to " needs its spaces
    ("from 5 to 9 seconds", [[5.0, 9.0]]),
    ("00:00:12 - 00:00:31", [[0.0, 12.0]]),                 # "12 - 00", reordered
    ("start 00:01:05\nend 00:01:30", [[0.0, 0.0]]),         # step 4 takes the leading 00
    ("It ends at 30 - 20", [[20.0, 30.0]]),
    ("-5 - 3", [[3.0, 5.0]]),                               # no negative numbers
    ("5 - 10...", None),                                    # official: float('10...') crashes; ours: Failed
    ("nothing here", None),
])
def test_tvg_format(text, spans):
    if "..." in text:
        with pytest.raises(Unparsable):
            tvg_format(text)
    else:
        assert tvg_format(text) == spans


def test_threshold_means_letters_and_random_caption():
    rates, mean = at_thresholds("R", [3, 2, 1, 0], 4)
    assert rates == {"R@0.1": 0.75, "R@0.3": 0.5, "R@0.5": 0.25, "R@0.7": 0.0} and mean == 0.375
    lone = ("b", "b.", "b)", "b, x", "i think", "bb", "b-")
    assert [lone_letter(p) for p in lone] == ["b", "b", "b", "b", "i", None, None]
    assert [letter_map([{"o": [0] * n}]) for n in (3, 4, 5, 6)] == [None, "abcd", "abcde", None]
    assert letter_map([]) is None
    assert [letter_choice(p, 3) for p in ("B", "c)", "D.", "(B)")] == [1, 2, None, None]  # GVQ: any case, n letters
    # the official stream: randint for the length, then one choice per letter
    rng, ref = random.Random(7), random.Random(7)
    word = random_caption(rng)
    assert word == "".join(ref.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(ref.randint(10, 20)))
    assert 10 <= len(word) <= 20 and rng.random() == ref.random()


def test_temporal_iou_is_float32():
    iou = temporal_iou([[10, 20]], [[0, 12]])  # 2 / 20: 0.1 in float32 is just above 0.1
    assert iou.dtype == torch.float32 and iou.item() >= 0.1 and iou.item() != 0.1
    assert math.isnan(temporal_iou([[5, 5]], [[5, 5]]).item())  # two points: 0 / 0


def test_dvc_format_tricky_parses():
    spans, caps = dvc_format("The video shows: 0 - 5 seconds, cutting. 6 - 9 seconds, frying now.")
    assert spans == [[0.0, 5.0], [6.0, 9.0]] and caps == ["the video shows:", "cutting."]  # captions shift by one
    assert dvc_format("At 1:30 the man cuts bread.") == ([[70, 110]], ["At 1:30 the man cuts bread."])
    assert dvc_format("the chef cuts 12 onions and 3 more")[0] == [[3.0, 12.0]]
    assert dvc_format("start time 5, end time 9, cut") is None
    assert dvc_format("no times at all") is None
    # each matched "s - e" string is cut out everywhere: "2 - 4" also cuts into "12 - 45"
    assert dvc_format("2 - 4 seconds, cut the onion. 12 - 45 seconds, fry the onion.") == (
        [[2.0, 4.0], [12.0, 45.0]], ["cut the onion. 1", "5 , fry the onion."])
    assert dvc_format("At 5 the man cuts bread")[0] == [[5.0, 45.0]]          # one time near 0: [t, t + 40]
    assert dvc_format("around 10... he cuts\nAt 30 he fries it")[0] == [[10.0, 50.0]]  # a bad piece is skipped
    assert dvc_format("Time: 1:30 the man cuts") is None                       # two ':' need two m:ss
    assert dvc_format("1:5 the man cuts bread")[0] == [[45.0, 85.0]]
    assert dvc_format("he cuts at 3:57") is None           # '.'-split pieces end in '.': int('57.') fails
    assert dvc_format("5:30.5 a man walks in\n") is None
    assert dvc_format("10.. - 20, cut\n") is None          # a bad number in the paragraph step: no fallback
    assert dvc_format("cuts 1, 2 and 3 onions") is None                        # three numbers
    assert dvc_format("At 10.1234 seconds, he cuts")[0] == [[1214.0, 1254.0]]  # '.' splits the fallback's pieces
    assert dvc_format("start time:5\nend time:10\ndescription: cuts bread") is None  # one space after ':'
    assert dvc_format("start time: 5\nend time: 10\ndescription: cut.\nstart time: 12\nend time: 20\n"
                      "description: fry the onion well") == ([[5.0, 10.0]], ["fry the onion well"])
    two = dvc_format("0 - 10 seconds, a red square appears.\n20 - 30 seconds, a blue circle moves left.")
    assert two == ([[0.0, 10.0], [20.0, 30.0]], ["a red square appears.", "a blue circle moves left."])


# ---------------------------------------------------------------------------------------------
# E.T.Bench tasks

def test_tvg_epm():
    answers = ["The event happens in 10.0 - 20.0 seconds.", "The event happens in 15 - 25 seconds.",
               "starts at 12 and ends at 18.", "starts at 12\nends at 18", "from 5 to9", "00:00:12 - 00:00:31",
               "5 - 10...", "10 - 20 and then 0 - 5"]
    out = score_tvg([rec("tvg", a, tgt=[10, 20]) for a in answers])
    assert list(out) == ["Total", "Failed", "mIoU", "F1@0.1", "F1@0.3", "F1@0.5", "F1@0.7", "F1"]
    ious = [1.0, 1 / 3, 0.6, 0.1, 1.0]  # failed: 3rd, 5th, 7th
    assert out["Total"] == 8 and out["Failed"] == 3
    assert out["mIoU"] == pytest.approx(sum(ious) / 8, rel=1e-6)
    assert [out[f"F1@{t}"] for t in THRESHOLDS] == [5 / 8, 4 / 8, 3 / 8, 2 / 8]
    assert out["F1"] == pytest.approx(14 / 32)


def test_tem_tal_evs_vhd():
    tem = score_tvg([rec("tem", "22 - 30", tgt=[[0, 10], [20, 30]]), rec("tem", "none", tgt=[[0, 10]])], tem=True)
    assert tem["mIoU"] == pytest.approx(0.4) and tem["R@0.7"] == 0.5 and tem["mRec"] == 0.5 and tem["Failed"] == 1
    tal = score_tal([rec("tal", "0 - 10, 50 - 60", tgt=[[0, 10], [20, 30]]), rec("tal", "none", tgt=[[0, 10]])])
    assert all(tal[f"F1@{t}"] == pytest.approx(0.25) for t in THRESHOLDS) and tal["F1"] == pytest.approx(0.25)
    evs = score_evs([rec("evs", "2.5 - 10", tgt=[[0, 10]]), rec("evs", "3.5 - 10", tgt=[[0, 10]]),
                     rec("evs", "nothing", tgt=[[0, 10]])])
    # round(2.5) = 2 and round(3.5) = 4 (banker's rounding): F1 8/9 and 6/8; the failed sample leaves the mean
    assert evs == {"Total": 3, "Failed": 1, "F1": pytest.approx((2 * 0.8 / 1.8 + 2 * 0.6 / 1.6) / 2)}
    annot = [[[10, 14], [20, 26]], [[12, 16]]]
    vhd = score_vhd([rec("vhd", "The highlight is at 15.0 seconds.", tgt=annot), rec("vhd", "at 2:30", tgt=annot),
                     rec("vhd", "no number", tgt=annot), rec("vhd", "at 14", tgt=[[10, 14]])])
    assert vhd == {"Total": 4, "Failed": 1, "F1": 0.5}


OPTIONS = ["a dog runs on the beach", "a man cooks pasta in a kitchen", "a woman paints a wall", "children play football"]
MCQ = ["(B)", "B) a man cooks pasta in a kitchen", "Best option: (B) a man cooks pasta",
       "(A) a man cooks pasta in a kitchen",                   # wrong letter, right text
       "",                                                     # Failed
       "I think it is the dog on the beach",                  # "i " counts as a letter parse: not Failed
       "The answer is the man cooking pasta in the kitchen",  # no letter: Failed, but a similarity hit
       "(D) children play football"]


def test_multiple_choice_etchat_and_strict(embed):
    recs = [rec("rar", a, o=OPTIONS, p=1) for a in MCQ]
    assert score_mcq(recs, embed) == {"Total": 8, "Failed": 2, "Acc": 5 / 8}
    assert score_mcq(recs, embed, strict=True) == {"Total": 8, "Failed": 2, "Acc": 4 / 8}
    span_opts = [[0.0, 4.0], [4.0, 9.5], [9.5, 13.0], [13.0, 20.0]]  # options as spans: "s - e"
    assert score_mcq([rec("eca", "4.0 - 9.5", o=span_opts, p=1)], embed)["Acc"] == 1.0
    assert score_mcq([rec("rvq", "(B)", o=OPTIONS[:3], p=1)], embed) == {"Total": 1, "Failed": 1, "Acc": 0.0}


def test_gvq(embed):
    recs = [rec("gvq", a, o=OPTIONS, p=1, tgt=[12.0, 18.0]) for a in
            ["(B) a man cooks pasta. The evidence is at 12.0 - 18.5 seconds.", "B", "", "(C) a woman, 12 - 18"]]
    out = score_gvq(recs, embed)
    iou = 6 / 6.5
    assert list(out) == ["Total", "Failed", "mIoU", "R@0.1", "R@0.3", "R@0.5", "R@0.7", "mRec", "Acc"]
    assert out["Total"] == 4 and out["Failed"] == 2 and out["Acc"] == 0.5
    assert all(out[f"R@{t}"] == 0.25 for t in THRESHOLDS) and out["mRec"] == 0.25
    assert out["mIoU"] == pytest.approx(iou / 4, rel=1e-6)


def test_dvc_localisation_scale_and_captions(scorers):
    g = ["a red square appears", "a blue circle moves left"]
    good = "0 - 10 seconds, a red square appears.\n20 - 30 seconds, a blue circle moves left."
    recs = [rec("dvc", good, video="a.mp4", tgt=[[0, 10], [20, 30]], g=g),
            rec("dvc", "no timestamps here", video="b.mp4", tgt=[[0, 10]], g=["x"])]
    out = score_dvc(recs, scorers)
    # P = R = 1 on the parsed video, times parsed/Total = 1/2
    assert list(out)[:7] == ["Total", "Failed", "F1@0.1", "F1@0.3", "F1@0.5", "F1@0.7", "F1"]
    assert list(out)[7:] == list(CAPTION_KEYS)
    assert out["Failed"] == 1 and all(out[f"F1@{t}"] == pytest.approx(0.5) for t in THRESHOLDS)
    # identical captions: caption metrics over parsed videos only, not scaled
    assert out["Bleu_1"] == pytest.approx(1.0, abs=1e-6) and out["METEOR"] == pytest.approx(1.0, abs=1e-3)
    assert out["SentSim"] == pytest.approx(1.0, abs=1e-5) and out["ROUGE_L"] == pytest.approx(1.0)
    # a prediction that overlaps nothing is paired with a random string: ~0 caption scores
    miss = score_dvc([rec("dvc", "50 - 60 seconds, a red square appears.", tgt=[[0, 10]], g=g[:1])], scorers)
    assert miss["F1"] == 0 and miss["Bleu_1"] < 1e-3 and miss["CIDEr"] < 1e-3


def test_score_etbench_layout_rounding_and_table(embed):
    recs = ([rec("tvg", "10 - 20", source="s1", tgt=[10, 20]), rec("tvg", "15 - 25", source="s2", tgt=[10, 20])]
            + [rec("rar", a, o=OPTIONS, p=1) for a in MCQ[:3]])
    out = score_etbench(recs, embed=embed)
    assert list(out) == ["tvg", "rar"] and list(out["tvg"]) == ["s1", "s2"]
    assert out["tvg"]["s2"]["mIoU"] == round(1 / 3, 5) and out["tvg"]["s2"]["Total"] == 1
    task, merged = summary(out)
    assert task["tvg"] == round((1.0 + 0.5) / 2, 5)  # the unweighted mean over sources
    assert merged == {"Acc (ref)": None, "F1 (gnd)": None}  # incomplete rows are not averaged
    assert "75.0" in table(out)


def test_score_etbench_uses_the_given_embedder_and_scorers(scorers, monkeypatch):
    def refuse(*_):
        raise AssertionError("score_etbench started its own Embedder / CaptionScorers")
    monkeypatch.setattr(etbench, "Embedder", refuse)
    monkeypatch.setattr(etbench, "CaptionScorers", refuse)
    recs = [rec("rar", "The answer is the man cooking pasta in the kitchen", o=OPTIONS, p=1),  # similarity
            rec("dvc", "0 - 10 seconds, a red square appears.", tgt=[[0, 10]], g=["a red square appears"])]
    out = score_etbench(recs, scorers=scorers)  # no embed: the scorers' one
    assert out["rar"]["src"]["Acc"] == 1.0 and out["dvc"]["src"]["F1"] == 1.0
    with pytest.raises(AssertionError, match="started its own"):
        score_etbench(recs[:1])
    with pytest.raises(ValueError, match="unknown protocol"):
        score_etbench(recs, protocol="official", scorers=scorers)


# ---------------------------------------------------------------------------------------------
# The D2VLM protocol

def test_d2vlm_protocol(embed):
    tvg = d2vlm_tvg([rec("tvg", a, tgt=[10, 20]) for a in [
        "10 - 20</evi>The event happens in 0 - 5 and 10 - 20 seconds.",  # the best answer span counts
        "The event happens in 10 - 20 seconds.",                         # no </evi>: Failed
        "</evi>The event happens in 15 - 25."]])                         # no evidence: the answer's
    assert list(tvg) == ["Total", "Failed", "mIoU", "mIoU_evi", "F1@0.1", "F1@0.3", "F1@0.5", "F1@0.7", "F1",
                         "F1_evi@0.1", "F1_evi@0.3", "F1_evi@0.5", "F1_evi@0.7", "F1_evi"]
    assert tvg["Failed"] == 1 and tvg["mIoU"] == pytest.approx((1 + 1 / 3) / 3) == tvg["mIoU_evi"]
    assert [tvg[f"F1@{t}"] for t in THRESHOLDS] == [2 / 3, 2 / 3, 1 / 3, 1 / 3]
    mcq = d2vlm_mcq([rec("rar", a, o=OPTIONS, p=1) for a in [
        "x</evi>(B)", "(A) a man cooks pasta in a kitchen", "The answer is the man cooking pasta in the kitchen", ""]],
        embed)
    assert mcq["Acc"] == 0.5 and mcq["Failed"] == 2 and mcq["Matched_count"] == 2  # a wrong letter is final
    assert mcq["correct_ratio_within_matched"] == pytest.approx(0.5)
    # TAL: a sample whose evidence matches nothing resets the evidence accumulator (the release's bug)
    good, bad = rec("tal", "0 - 10</evi>0 - 10", tgt=[[0, 10]]), rec("tal", "50 - 60</evi>0 - 10", tgt=[[0, 10]])
    assert d2vlm_tal([good, bad])["F1_evi"] == 0 and d2vlm_tal([bad, good])["F1_evi"] == 0.5
    assert d2vlm_tal([good, bad])["F1"] == 1.0
    evs = d2vlm_evs([rec("evs", "0 - 4</evi>5 - 10", tgt=[[0, 10]])])  # one map for answer and evidence
    assert evs["F1"] == evs["F1_evi"] == pytest.approx(2 * 0.9 / 1.9)
    annot = [[[12, 16]]]
    vhd = d2vlm_vhd([rec("vhd", "10 - 12</evi>The highlight is at 14 - 16 seconds.", tgt=annot),
                     rec("vhd", "at 15", tgt=annot)])
    assert vhd == {"Total": 2, "Failed": 1, "F1": 0.5, "F1_evi": 0.0}
    out = score_etbench([rec("tvg", "10 - 20</evi>10 - 20", tgt=[10, 20])], protocol="d2vlm", embed=embed)
    assert out["tvg"]["src"]["F1_evi"] == 1.0 and "(evidence)" in table(out)


def test_d2vlm_evs_infinite_end_skips_the_next_span():
    huge = "9" * 400  # float() gives inf
    # answer spans [0, 10], [20, inf], [30, 40]: [20, inf] is removed and [30, 40] skipped by the answer loop
    skipped = d2vlm_evs([rec("evs", f"50 - 60</evi>0 - 10, 20 - {huge}, 30 - 40", tgt=[[30, 40]])])
    assert skipped == {"Total": 1, "Failed": 0, "F1": 0.0, "F1_evi": 0.0}  # painted: 0-10 and the evidence 50-60
    # no evidence: it is the answer's list, which still holds [30, 40] after the removal
    aliased = d2vlm_evs([rec("evs", f"</evi>0 - 10, 20 - {huge}, 30 - 40", tgt=[[30, 40]])])
    assert aliased["F1"] == aliased["F1_evi"] == pytest.approx(2 / 3)
    both = d2vlm_evs([rec("evs", f"</evi>{huge} - {huge}", tgt=[[30, 40]])])  # an infinite start: Failed
    assert both["Failed"] == 1 and score_evs([rec("evs", f"0 - {huge}", tgt=[[0, 10]])])["Failed"] == 1


def test_d2vlm_dense_captions(scorers):
    dvc = score_dvc([rec("dvc", "0 - 10, 20 - 26</evi>0 - 10 seconds, crack eggs.\n20 - 30 seconds, whisk.",
                         tgt=[[0, 10], [20, 30]], g=["crack eggs", "whisk"])], scorers, d2vlm=True)
    assert dvc["F1"] == 1.0 and dvc["F1_evi@0.5"] == 1.0 and dvc["F1_evi@0.7"] == 0.5  # evidence IoU 1 and 0.6
    assert dvc["F1_evi"] == pytest.approx(0.875)


# ---------------------------------------------------------------------------------------------
# Charades-STA, YouCook2

def test_charades_official_denominator(tmp_path):
    answers = ["10.0 - 20.0</evi>The event happens in 10.0 - 20.0 seconds.",
               "12 - 20</evi>The event happens in 15 - 25 seconds.",   # the answer's span wins
               "10 - 20</evi>nothing",                                  # no answer span: the evidence's
               "The event happens in 10 - 20 seconds.",                 # no </evi>: Failed (official: KeyError)
               "</evi>The event happens in 10 - 20.",                   # no evidence span: Failed (TypeError)
               "5 - 8</evi>The event happens in 10 - 20...",            # float("20..."): Failed (ValueError)
               "<evi>11.5 - 17</EVI>The event happens in 10 - 20 s.",   # the split is case-blind
               "<evi>20 - 10</evi>I am not sure.",                      # evidence as written: reversed, IoU 0
               "from 10 to 20</evi>The event happens in 10 - 20."]      # evidence takes "s - e" only: Failed
    recs = [rec("tvg", a, source="charades_sta", tgt=[10.0, 20.0]) for a in answers] + [rec("tvg", "1 - 2", tgt=[1, 2])]
    out = score_charades(recs)
    assert (out["Total"], out["Failed"], out["num"]) == (9, 4, 5)  # IoU 1, 1/3, 1, 1, 0
    assert out["R1@0.3"] == 80.0 and out["R1@0.5"] == 60.0 and out["R1@0.7"] == 60.0
    assert out["mIoU"] == pytest.approx((3 + 1 / 3) / 5)
    ann = {"annotations": [{"image_id": "AB12.mp4", "caption": "person opens a door.", "timestamp": [1.5, 7.0], "id": 0}]}
    (tmp_path / "test.json").write_text(json.dumps(ann))
    r = charades_records(tmp_path / "test.json")[0]
    assert r["video"] == "charades/compressed_videos/AB12.mp4" and r["tgt"] == [1.5, 7.0] and r["idx"] == 0
    assert "described by the sentence: 'person opens a door'. The format" in r["q"]
    # the release's str.strip("."): dots at both ends go, spaces stay (a caption ending ". " keeps its dot)
    ann["annotations"][0]["caption"] = "..person opens a door. "
    (tmp_path / "test.json").write_text(json.dumps(ann))
    assert "sentence: 'person opens a door. '. The" in charades_records(tmp_path / "test.json")[0]["q"]


def test_chased_dp_is_the_best_order_preserving_matching():
    import itertools
    rng = np.random.default_rng(0)
    for _ in range(30):
        S, K = rng.integers(1, 5), rng.integers(1, 5)
        s = rng.uniform(0, 1, (S, K)) * (rng.uniform(size=(S, K)) > 0.3)
        best = 0.0
        for n in range(1, min(S, K) + 1):  # every matching that keeps both orders
            for gi in itertools.combinations(range(S), n):
                for pj in itertools.combinations(range(K), n):
                    best = max(best, sum(s[g, p] for g, p in zip(gi, pj)))
        assert chased_dp(s) == pytest.approx(best)


def test_youcook2(scorers):
    assert dvc_format_d2vlm("0 - 10</evi>0 - 10 seconds, crack eggs.</evi>50 - 60 seconds, later part") == (
        [[0.0, 10.0]], ["crack eggs."])                                    # the answer is the 2nd part, not the last
    assert dvc_format_d2vlm("0 - 10 seconds, crack eggs.") is None      # no delimiter
    assert dvc_format_d2vlm("</evi>3 - 8... seconds, whisk them well")[0] == [[3.0, 8.0]]  # dot runs -> a space
    recs = [
        {"task": "dvc", "source": "youcook2", "video": "yc/a.mp4", "tgt": [[0, 10], [20, 30]],
         "g": ["crack the eggs", "whisk the eggs"],
         "a": "0 - 10, 20 - 30</evi>0 - 10 seconds, crack the eggs.\n20 - 30 seconds, whisk the eggs."},
        {"task": "dvc", "source": "youcook2", "video": "yc/b.mp4", "tgt": [[5, 15]], "g": ["add salt"], "a": "5 - 15 add salt"},
        {"task": "dvc", "source": "youcook2", "video": "yc/c.mp4", "tgt": [[0, 8], [10, 20], [30, 40]],
         "g": ["cut onion", "fry onion", "add tomato"],
         "a": "x</evi>0 - 9 seconds, cut the onion.\n12 - 20 seconds, fry the onions.\n50 - 60 seconds, serve it."},
        {"task": "tvg", "source": "youcook2", "video": "yc/d.mp4", "tgt": [0, 1], "a": "0 - 1"},  # not dvc: ignored
    ]
    out = score_youcook2(recs, scorers)
    # a: P = R = 1 at every t; b: no delimiter, no predictions (P = 0 / max(K, 1)); c: IoU 8/9 and 0.8, one miss
    assert out["Precision@0.3"] == round((1 + 0 + 2 / 3) / 3 * 100, 1) == out["Recall@0.7"]
    assert out["Precision@0.9"] == round(1 / 3 * 100, 1)
    assert out["F1_Score"] == 50.0 and out["n_preds"] == round(5 / 3, 1) and out["SODA_c_1"] == -100.0
    assert list(out)[:4] == ["Para_CIDER", "Para_METEOR", "CIDER", "METEOR"]
    one = score_youcook2(recs[:1], scorers)  # identical captions, in order: SODA_c = 100
    assert one["SODA_c_2"] == pytest.approx(100.0, abs=0.2) and one["F1_Score"] == 100.0


# ---------------------------------------------------------------------------------------------
# Never crash; the predictions reader

def _junk(rng):
    pieces = ["10...", "5 - ", "- 3", " to ", "start", "ends", "happens in", "(", ")", "(B)", "best option:", "\n",
              "seconds", ":", "00:01:", ".", ",", " ", "1e9", "inf", "nan", "-", "</evi>", "<evi>", "é", "12", "3.5",
              "start time: ", "end time: ", "description: ", "* ", "a red square", "9999999999999999999999"]
    return "".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))


def test_fuzz_never_crashes(scorers):
    rng = random.Random(0)
    recs = []
    for i in range(3000):
        task = rng.choice(list(HEADLINE))
        r = rec(task, _junk(rng), video=f"v{i % 50}.mp4", source=rng.choice(["s1", "s2"]))
        s = sorted(rng.uniform(0, 100) for _ in range(2))
        if task in ONE_SPAN_TASKS:
            r["tgt"] = s if rng.random() > 0.05 else [s[0], s[0]]  # some zero-length spans
        elif task == "vhd":
            r["tgt"] = [[s]] if rng.random() > 0.5 else [s]
        else:
            r["tgt"] = [s, [s[1], s[1] + 5]]
        if task in OPTION_TASKS:
            r["o"], r["p"] = OPTIONS[:rng.choice([4, 4, 5, 3])] if rng.random() > 0.1 else OPTIONS, rng.randint(0, 3)
        if task in CAPTION_TASKS:
            r["g"] = ["a red square appears", "a blue circle"]
        recs.append(r)
    for r in recs[:2000]:  # every parser on every string; only tvg_format may raise (the official crashes)
        _safe_spans(r["a"])
        dvc_format(r["a"])
        dvc_format_d2vlm(r["a"])
        tvg_format_d2vlm(r["a"])
    non_caption = [r for r in recs if r["task"] not in CAPTION_TASKS]
    out = score_etbench(non_caption + [r for r in recs if r["task"] in CAPTION_TASKS][:150], embed=scorers.embed,
                        scorers=scorers)
    assert sum(m["Total"] for srcs in out.values() for m in srcs.values()) == len(non_caption) + 150
    table(out)


def test_load_predictions_names_bad_records(tmp_path):
    p = tmp_path / "pred.json"
    p.write_text(json.dumps([{"task": "tvg", "source": "s", "a": "1 - 2"}, {"task": "tvg", "source": "s"}]))
    with pytest.raises(ValueError, match=r"pred.json: record 1: field 'a' missing"):
        load_predictions(p)
