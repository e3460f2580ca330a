"""evaluate.py: each E.T.Bench task scored on hand-written responses whose official scores follow
from the rules (scoring-spec.md), the tricky parses, a fuzz run that must never crash, and the
inference path on the tiny model."""
import dataclasses
import json
import math
import random
import sys
import warnings

import numpy as np
import pytest
import torch

import data
import evaluate as ev
import model

warnings.filterwarnings("ignore")


def rec(task, a, **kw):
    return {"task": task, "source": kw.pop("source", "src"), "video": kw.pop("video", "v.mp4"), "a": a, **kw}


# ---------------------------------------------------------------------------------------------
# Parsers

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
        with pytest.raises(ev.Unparsable):
            ev.tvg_format(text)
    else:
        assert ev.tvg_format(text) == spans


def test_dvc_format_tricky_parses():
    spans, caps = ev.dvc_format("The video shows: 0 - 5 seconds, cutting. 6 - 9 seconds, frying now.")
    assert spans == [[0.0, 5.0], [6.0, 9.0]] and caps == ["the video shows:", "cutting."]  # captions shift by one
    assert ev.dvc_format("At 1:30 the man cuts bread.") == ([[70, 110]], ["At 1:30 the man cuts bread."])
    assert ev.dvc_format("the chef cuts 12 onions and 3 more")[0] == [[3.0, 12.0]]
    assert ev.dvc_format("start time 5, end time 9, cut") is None
    assert ev.dvc_format("no times at all") is None
    # each matched "s - e" string is cut out everywhere: "2 - 4" also cuts into "12 - 45"
    assert ev.dvc_format("2 - 4 seconds, cut the onion. 12 - 45 seconds, fry the onion.") == (
        [[2.0, 4.0], [12.0, 45.0]], ["cut the onion. 1", "5 , fry the onion."])
    assert ev.dvc_format("At 5 the man cuts bread")[0] == [[5.0, 45.0]]          # one time near 0: [t, t + 40]
    assert ev.dvc_format("around 10... he cuts\nAt 30 he fries it")[0] == [[10.0, 50.0]]  # a bad piece is skipped
    assert ev.dvc_format("Time: 1:30 the man cuts") is None                       # two ':' need two m:ss
    assert ev.dvc_format("1:5 the man cuts bread")[0] == [[45.0, 85.0]]
    assert ev.dvc_format("he cuts at 3:57") is None           # '.'-split pieces end in '.': int('57.') fails
    assert ev.dvc_format("5:30.5 a man walks in\n") is None
    assert ev.dvc_format("10.. - 20, cut\n") is None          # a bad number in the paragraph step: no fallback
    assert ev.dvc_format("cuts 1, 2 and 3 onions") is None                        # three numbers
    assert ev.dvc_format("At 10.1234 seconds, he cuts")[0] == [[1214.0, 1254.0]]  # '.' splits the fallback's pieces
    assert ev.dvc_format("start time:5\nend time:10\ndescription: cuts bread") is None  # one space after ':'
    assert ev.dvc_format("start time: 5\nend time: 10\ndescription: cut.\nstart time: 12\nend time: 20\n"
                         "description: fry the onion well") == ([[5.0, 10.0]], ["fry the onion well"])
    two = ev.dvc_format("0 - 10 seconds, a red square appears.\n20 - 30 seconds, a blue circle moves left.")
    assert two == ([[0.0, 10.0], [20.0, 30.0]], ["a red square appears.", "a blue circle moves left."])


def test_temporal_iou_is_float32():
    iou = ev.temporal_iou([[10, 20]], [[0, 12]])  # 2 / 20: 0.1 in float32 is just above 0.1
    assert iou.dtype == torch.float32 and iou.item() >= 0.1 and iou.item() != 0.1
    assert math.isnan(ev.temporal_iou([[5, 5]], [[5, 5]]).item())  # two points: 0 / 0


# ---------------------------------------------------------------------------------------------
# Tasks

def test_tvg_epm():
    answers = ["The event happens in 10.0 - 20.0 seconds.", "The event happens in 15 - 25 seconds.",
               "starts at 12 and ends at 18.", "starts at 12\nends at 18", "from 5 to9", "00:00:12 - 00:00:31",
               "5 - 10...", "10 - 20 and then 0 - 5"]
    out = ev.score_tvg([rec("tvg", a, tgt=[10, 20]) for a in answers])
    assert list(out) == ["Total", "Failed", "mIoU", "F1@0.1", "F1@0.3", "F1@0.5", "F1@0.7", "F1"]
    ious = [1.0, 1 / 3, 0.6, 0.1, 1.0]  # failed: 3rd, 5th, 7th
    assert out["Total"] == 8 and out["Failed"] == 3
    assert out["mIoU"] == pytest.approx(sum(ious) / 8, rel=1e-6)
    assert [out[f"F1@{t}"] for t in ev.THRESHOLDS] == [5 / 8, 4 / 8, 3 / 8, 2 / 8]
    assert out["F1"] == pytest.approx(14 / 32)


def test_tem_tal_evs_vhd():
    tem = ev.score_tvg([rec("tem", "22 - 30", tgt=[[0, 10], [20, 30]]), rec("tem", "none", tgt=[[0, 10]])], tem=True)
    assert tem["mIoU"] == pytest.approx(0.4) and tem["R@0.7"] == 0.5 and tem["mRec"] == 0.5 and tem["Failed"] == 1
    tal = ev.score_tal([rec("tal", "0 - 10, 50 - 60", tgt=[[0, 10], [20, 30]]), rec("tal", "none", tgt=[[0, 10]])])
    assert all(tal[f"F1@{t}"] == pytest.approx(0.25) for t in ev.THRESHOLDS) and tal["F1"] == pytest.approx(0.25)
    evs = ev.score_evs([rec("evs", "2.5 - 10", tgt=[[0, 10]]), rec("evs", "3.5 - 10", tgt=[[0, 10]]),
                        rec("evs", "nothing", tgt=[[0, 10]])])
    # round(2.5) = 2 and round(3.5) = 4 (banker's rounding): F1 8/9 and 6/8; the failed sample leaves the mean
    assert evs == {"Total": 3, "Failed": 1, "F1": pytest.approx((2 * 0.8 / 1.8 + 2 * 0.6 / 1.6) / 2)}
    annot = [[[10, 14], [20, 26]], [[12, 16]]]
    vhd = ev.score_vhd([rec("vhd", "The highlight is at 15.0 seconds.", tgt=annot), rec("vhd", "at 2:30", tgt=annot),
                        rec("vhd", "no number", tgt=annot), rec("vhd", "at 14", tgt=[[10, 14]])])
    assert vhd == {"Total": 4, "Failed": 1, "F1": 0.5}


OPTIONS = ["a dog runs on the beach", "a man cooks pasta in a kitchen", "a woman paints a wall", "children play football"]
MCQ = ["(B)", "B) a man cooks pasta in a kitchen", "Best option: (B) a man cooks pasta",
       "(A) a man cooks pasta in a kitchen",                   # wrong letter, right text
       "",                                                     # Failed
       "I think it is the dog on the beach",                  # "i " counts as a letter parse: not Failed
       "The answer is the man cooking pasta in the kitchen",  # no letter: Failed, but a similarity hit
       "(D) children play football"]


def test_multiple_choice_etchat_and_strict():
    recs = [rec("rar", a, o=OPTIONS, p=1) for a in MCQ]
    assert ev.score_mcq(recs) == {"Total": 8, "Failed": 2, "Acc": 5 / 8}
    assert ev.score_mcq(recs, strict=True) == {"Total": 8, "Failed": 2, "Acc": 4 / 8}
    span_opts = [[0.0, 4.0], [4.0, 9.5], [9.5, 13.0], [13.0, 20.0]]  # options as spans: "s - e"
    assert ev.score_mcq([rec("eca", "4.0 - 9.5", o=span_opts, p=1)])["Acc"] == 1.0
    assert ev.score_mcq([rec("rvq", "(B)", o=OPTIONS[:3], p=1)]) == {"Total": 1, "Failed": 1, "Acc": 0.0}


def test_gvq():
    recs = [rec("gvq", a, o=OPTIONS, p=1, tgt=[12.0, 18.0]) for a in
            ["(B) a man cooks pasta. The evidence is at 12.0 - 18.5 seconds.", "B", "", "(C) a woman, 12 - 18"]]
    out = ev.score_gvq(recs)
    iou = 6 / 6.5
    assert list(out) == ["Total", "Failed", "mIoU", "R@0.1", "R@0.3", "R@0.5", "R@0.7", "mRec", "Acc"]
    assert out["Total"] == 4 and out["Failed"] == 2 and out["Acc"] == 0.5
    assert all(out[f"R@{t}"] == 0.25 for t in ev.THRESHOLDS) and out["mRec"] == 0.25
    assert out["mIoU"] == pytest.approx(iou / 4, rel=1e-6)


@pytest.fixture(scope="module")
def scorers():
    return ev.CaptionScorers()


def test_dvc_localisation_scale_and_captions(scorers):
    g = ["a red square appears", "a blue circle moves left"]
    good = "0 - 10 seconds, a red square appears.\n20 - 30 seconds, a blue circle moves left."
    recs = [rec("dvc", good, video="a.mp4", tgt=[[0, 10], [20, 30]], g=g),
            rec("dvc", "no timestamps here", video="b.mp4", tgt=[[0, 10]], g=["x"])]
    out = ev.score_dvc(recs, scorers)
    # P = R = 1 on the parsed video, times parsed/Total = 1/2
    assert list(out)[:7] == ["Total", "Failed", "F1@0.1", "F1@0.3", "F1@0.5", "F1@0.7", "F1"]
    assert list(out)[7:] == list(ev.CAPTION_KEYS)
    assert out["Failed"] == 1 and all(out[f"F1@{t}"] == pytest.approx(0.5) for t in ev.THRESHOLDS)
    # identical captions: caption metrics over parsed videos only, not scaled
    assert out["Bleu_1"] == pytest.approx(1.0, abs=1e-6) and out["METEOR"] == pytest.approx(1.0, abs=1e-3)
    assert out["SentSim"] == pytest.approx(1.0, abs=1e-5) and out["ROUGE_L"] == pytest.approx(1.0)
    # a prediction that overlaps nothing is paired with a random string: ~0 caption scores
    miss = ev.score_dvc([rec("dvc", "50 - 60 seconds, a red square appears.", tgt=[[0, 10]], g=g[:1])], scorers)
    assert miss["F1"] == 0 and miss["Bleu_1"] < 1e-3 and miss["CIDEr"] < 1e-3


def test_score_etbench_layout_rounding_and_table(scorers, monkeypatch):
    recs = ([rec("tvg", "10 - 20", source="s1", tgt=[10, 20]), rec("tvg", "15 - 25", source="s2", tgt=[10, 20])]
            + [rec("rar", a, o=OPTIONS, p=1) for a in MCQ[:3]])
    out = ev.score_etbench(recs)
    assert list(out) == ["tvg", "rar"] and list(out["tvg"]) == ["s1", "s2"]
    assert out["tvg"]["s2"]["mIoU"] == round(1 / 3, 5) and out["tvg"]["s2"]["Total"] == 1
    task, merged = ev.summary(out)
    assert task["tvg"] == round((1.0 + 0.5) / 2, 5)  # the unweighted mean over sources
    assert merged == {"Acc (ref)": None, "F1 (gnd)": None}  # incomplete rows are not averaged
    assert "75.0" in ev.table(out)


# ---------------------------------------------------------------------------------------------
# Never crash

def _junk(rng):
    pieces = ["10...", "5 - ", "- 3", " to ", "start", "ends", "happens in", "(", ")", "(B)", "best option:", "\n",
              "seconds", ":", "00:01:", ".", ",", " ", "1e9", "inf", "nan", "-", "</evi>", "<evi>", "é", "12", "3.5",
              "start time: ", "end time: ", "description: ", "* ", "a red square", "9999999999999999999999"]
    return "".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))


def test_fuzz_never_crashes(scorers):
    rng = random.Random(0)
    recs = []
    for i in range(3000):
        task = rng.choice(list(ev.HEADLINE))
        r = rec(task, _junk(rng), video=f"v{i % 50}.mp4", source=rng.choice(["s1", "s2"]))
        s = sorted(rng.uniform(0, 100) for _ in range(2))
        if task in ("tvg", "epm", "gvq"):
            r["tgt"] = s if rng.random() > 0.05 else [s[0], s[0]]  # some zero-length spans
        elif task == "vhd":
            r["tgt"] = [[s]] if rng.random() > 0.5 else [s]
        else:
            r["tgt"] = [s, [s[1], s[1] + 5]]
        if task in ("rar", "eca", "rvq", "gvq"):
            r["o"], r["p"] = OPTIONS[:rng.choice([4, 4, 5, 3])] if rng.random() > 0.1 else OPTIONS, rng.randint(0, 3)
        if task in ("dvc", "slc"):
            r["g"] = ["a red square appears", "a blue circle"]
        recs.append(r)
    for r in recs[:2000]:  # every parser on every string; only tvg_format may raise (the official crashes)
        ev._safe_spans(r["a"])
        ev.dvc_format(r["a"])
        ev.dvc_format_d2vlm(r["a"])
        ev.tvg_format_d2vlm(r["a"])
    non_caption = [r for r in recs if r["task"] not in ("dvc", "slc")]
    out = ev.score_etbench(non_caption + [r for r in recs if r["task"] in ("dvc", "slc")][:150])
    assert sum(m["Total"] for srcs in out.values() for m in srcs.values()) == len(non_caption) + 150
    ev.table(out)


def test_load_predictions_names_bad_records(tmp_path):
    p = tmp_path / "pred.json"
    p.write_text(json.dumps([{"task": "tvg", "source": "s", "a": "1 - 2"}, {"task": "tvg", "source": "s"}]))
    with pytest.raises(ValueError, match=r"pred.json: record 1: field 'a' missing"):
        ev.load_predictions(p)


# ---------------------------------------------------------------------------------------------
# Inference

@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A random tiny model saved as a checkpoint, and one synthetic test video's records."""
    root = tmp_path_factory.mktemp("eval")
    data.make_synthetic(root / "syn", n_train=0, n_test=1, workers=1)
    torch.manual_seed(0)
    m = model.build_model(model.PRESETS["tiny"])
    (root / "ckpt").mkdir()
    model.save_weights(m, root / "ckpt", full=True)
    return root / "ckpt", root / "syn"


def test_inference_writes_a_scorable_predictions_file(tiny_ckpt, capsys):
    ckpt, syn = tiny_ckpt
    ev.main(["--ckpt", str(ckpt), "--data", str(syn / "test.json"), "--videos", str(syn / "videos"),
             "--max-new-tokens", "12", "--batch-size", "4"])
    preds = ev.load_predictions(ckpt / "predictions_test.json")
    truth = json.loads((syn / "test.json").read_text())
    assert [p["idx"] for p in preds] == [t["idx"] for t in truth]
    assert all(isinstance(p["a"], str) for p in preds)
    metrics = json.loads((ckpt / "metrics.json").read_text())
    assert set(metrics) == {r["task"] for r in truth} and metrics["tvg"]["synthetic"]["Total"] == 1
    assert "TVG" in capsys.readouterr().out
    # batched generation gives what one-by-one generation gives
    one = ev.predict(model.from_checkpoint(ckpt).eval(), truth[:2], syn / "videos", batch_size=1,
                     max_new_tokens=12, progress=False)
    assert [p["a"] for p in one] == [p["a"] for p in preds[:2]]
    assert np.isfinite(metrics["tvg"]["synthetic"]["F1"])
    # records too long for max_len get an empty answer (Failed when scored), reported, never dropped
    short = model.from_checkpoint(ckpt).eval()
    short.cfg = dataclasses.replace(short.cfg, max_len=40)
    cut = ev.predict(short, truth, syn / "videos", max_new_tokens=4, progress=False)
    assert len(cut) == len(truth) and all(p["a"] == "" for p in cut)
    assert "too long for max_len=40" in capsys.readouterr().err
    assert ev.score_etbench([p for p in cut if p["task"] == "tvg"])["tvg"]["synthetic"]["Failed"] == 1


def test_one_video_answer_and_plot(tiny_ckpt, tmp_path, capsys, monkeypatch):
    ckpt, syn = tiny_ckpt
    video = syn / "videos" / "test_0000.mp4"
    q = "What happens after 2.0 - 4.0 seconds? Answer with <start time> - <end time>."
    ev.main(["--ckpt", str(ckpt), "--video", str(video), "--question", q, "--max-new-tokens", "16"])
    out = capsys.readouterr().out.splitlines()
    m = model.from_checkpoint(ckpt).eval()
    answer = ev.answer_video(m, video, q, max_new_tokens=16)
    assert out[0] == answer["text"].splitlines()[0]
    n = len(data.sample_frames(video, m.cfg.fps, m.cfg.image_size))
    assert answer["frames"] == n and all(len(p) == n for p in answer["probs"])
    assert len(answer["probs"]) == len(answer["spans"]) == answer["tokens"].count(m.token_id[data.EVI])
    for k, (s, e) in enumerate(answer["spans"]):
        assert f"<evi> {k + 1}: {s:.1f} - {e:.1f} s" in out[-len(answer["spans"]) + k]
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # matplotlib absent: a clear message
    with pytest.raises(SystemExit, match="--plot needs matplotlib"):
        ev.plot_evidence(answer, 1.0, tmp_path / "x.png")
    monkeypatch.undo()
    pytest.importorskip("matplotlib")
    fake = {"text": "0.0 - 3.0</evi>...", "spans": [[0.0, 3.0], [5.0, 5.0]], "probs": [[0.9] * 4 + [0.1] * 6, [0.2] * 10]}
    ev.plot_evidence(fake, 1.0, tmp_path / "sim.png")
    assert (tmp_path / "sim.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


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
    out = ev.score_charades(recs)
    assert (out["Total"], out["Failed"], out["num"]) == (9, 4, 5)  # IoU 1, 1/3, 1, 1, 0
    assert out["R1@0.3"] == 80.0 and out["R1@0.5"] == 60.0 and out["R1@0.7"] == 60.0
    assert out["mIoU"] == pytest.approx((3 + 1 / 3) / 5)
    ann = {"annotations": [{"image_id": "AB12.mp4", "caption": "person opens a door.", "timestamp": [1.5, 7.0], "id": 0}]}
    (tmp_path / "test.json").write_text(json.dumps(ann))
    r = ev.charades_records(tmp_path / "test.json")[0]
    assert r["video"] == "charades/compressed_videos/AB12.mp4" and r["tgt"] == [1.5, 7.0] and r["idx"] == 0
    assert "described by the sentence: 'person opens a door'. The format" in r["q"]


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
        assert ev.chased_dp(s) == pytest.approx(best)


def test_youcook2(scorers):
    assert ev.dvc_format_d2vlm("0 - 10</evi>0 - 10 seconds, crack eggs.</evi>50 - 60 seconds, later part") == (
        [[0.0, 10.0]], ["crack eggs."])                                    # the answer is the 2nd part, not the last
    assert ev.dvc_format_d2vlm("0 - 10 seconds, crack eggs.") is None      # no delimiter
    assert ev.dvc_format_d2vlm("</evi>3 - 8... seconds, whisk them well")[0] == [[3.0, 8.0]]  # dot runs -> a space
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
    out = ev.score_youcook2(recs, scorers)
    # a: P = R = 1 at every t; b: no delimiter, no predictions (P = 0 / max(K, 1)); c: IoU 8/9 and 0.8, one miss
    assert out["Precision@0.3"] == round((1 + 0 + 2 / 3) / 3 * 100, 1) == out["Recall@0.7"]
    assert out["Precision@0.9"] == round(1 / 3 * 100, 1)
    assert out["F1_Score"] == 50.0 and out["n_preds"] == round(5 / 3, 1) and out["SODA_c_1"] == -100.0
    assert list(out)[:4] == ["Para_CIDER", "Para_METEOR", "CIDER", "METEOR"]
    one = ev.score_youcook2(recs[:1], scorers)  # identical captions, in order: SODA_c = 100
    assert one["SODA_c_2"] == pytest.approx(100.0, abs=0.2) and one["F1_Score"] == 100.0


def test_d2vlm_protocol(scorers):
    tvg = ev.d2vlm_tvg([rec("tvg", a, tgt=[10, 20]) for a in [
        "10 - 20</evi>The event happens in 0 - 5 and 10 - 20 seconds.",  # the best answer span counts
        "The event happens in 10 - 20 seconds.",                         # no </evi>: Failed
        "</evi>The event happens in 15 - 25."]])                         # no evidence: the answer's
    assert list(tvg) == ["Total", "Failed", "mIoU", "mIoU_evi", "F1@0.1", "F1@0.3", "F1@0.5", "F1@0.7", "F1",
                         "F1_evi@0.1", "F1_evi@0.3", "F1_evi@0.5", "F1_evi@0.7", "F1_evi"]
    assert tvg["Failed"] == 1 and tvg["mIoU"] == pytest.approx((1 + 1 / 3) / 3) == tvg["mIoU_evi"]
    assert [tvg[f"F1@{t}"] for t in ev.THRESHOLDS] == [2 / 3, 2 / 3, 1 / 3, 1 / 3]
    mcq = ev.d2vlm_mcq([rec("rar", a, o=OPTIONS, p=1) for a in [
        "x</evi>(B)", "(A) a man cooks pasta in a kitchen", "The answer is the man cooking pasta in the kitchen", ""]])
    assert mcq["Acc"] == 0.5 and mcq["Failed"] == 2 and mcq["Matched_count"] == 2  # a wrong letter is final
    assert mcq["correct_ratio_within_matched"] == pytest.approx(0.5)
    # TAL: a sample whose evidence matches nothing resets the evidence accumulator (the release's bug)
    good, bad = rec("tal", "0 - 10</evi>0 - 10", tgt=[[0, 10]]), rec("tal", "50 - 60</evi>0 - 10", tgt=[[0, 10]])
    assert ev.d2vlm_tal([good, bad])["F1_evi"] == 0 and ev.d2vlm_tal([bad, good])["F1_evi"] == 0.5
    assert ev.d2vlm_tal([good, bad])["F1"] == 1.0
    evs = ev.d2vlm_evs([rec("evs", "0 - 4</evi>5 - 10", tgt=[[0, 10]])])  # one map for answer and evidence
    assert evs["F1"] == evs["F1_evi"] == pytest.approx(2 * 0.9 / 1.9)
    annot = [[[12, 16]]]
    vhd = ev.d2vlm_vhd([rec("vhd", "10 - 12</evi>The highlight is at 14 - 16 seconds.", tgt=annot),
                        rec("vhd", "at 15", tgt=annot)])
    assert vhd == {"Total": 2, "Failed": 1, "F1": 0.5, "F1_evi": 0.0}
    dvc = ev.score_dvc([rec("dvc", "0 - 10, 20 - 26</evi>0 - 10 seconds, crack eggs.\n20 - 30 seconds, whisk.",
                            tgt=[[0, 10], [20, 30]], g=["crack eggs", "whisk"])], scorers, d2vlm=True)
    assert dvc["F1"] == 1.0 and dvc["F1_evi@0.5"] == 1.0 and dvc["F1_evi@0.7"] == 0.5  # evidence IoU 1 and 0.6
    assert dvc["F1_evi"] == pytest.approx(0.875)
    out = ev.score_etbench([rec("tvg", "10 - 20</evi>10 - 20", tgt=[10, 20])], protocol="d2vlm")
    assert out["tvg"]["src"]["F1_evi"] == 1.0 and "(evidence)" in ev.table(out)
