"""The scorers never abort and never stall: answers the official scripts crash on or turn NaN are
Failed, the timestamp regexes match as the official ones do but in linear time, and a seeded fuzz
over every E.T.Bench task and protocol raises nothing and writes only finite numbers (seed 0)."""
import math
import random
import re
import time
import zlib

import numpy as np
import pytest

from data import CAPTION_TASKS, MCQ_TASKS, ONE_SPAN_TASKS, OPTION_TASKS
from scoring.captions import CAPTION_KEYS, CLOCK, START_END, _captions, dvc_format
from scoring.charades_youcook2 import score_charades
from scoring.d2vlm import d2vlm_gvq, d2vlm_mcq, d2vlm_tvg
from scoring.etbench import HEADLINE, PROTOCOLS, score_etbench, score_gvq, score_mcq, score_tal, score_tvg
from scoring.rules import _TO, PAIR, Embedder, Unscorable, closest_option

BIG = "9" * 40  # finite as a float64, infinite as the float32 the IoU is computed in
HUGE = "9" * 400  # infinite already as a float64
OPTIONS = ["a dog runs on the beach", "a man cooks pasta in a kitchen", "a woman paints a wall",
           "children play football", "a cat sleeps", "a bird sings"]
SEED = 0
FUZZ_ANSWERS = 5000  # per protocol
FUZZ_SECONDS = 30  # generous: well under 1 s per protocol on 2 cores
# the official patterns, as docs/scoring-rules.md#timestamp-parser, docs/scoring-rules.md#dvc-and-slc quote them
OFFICIAL = {"pair": (r"(\d+\.*\d*)\s*-\s*(\d+\.*\d*)", PAIR), "to": (r"(\d+\.*\d*)\s* to \s*(\d+\.*\d*)", _TO),
            "clock": (r"\d+\.*\d*:\d+\.*\d*", CLOCK),
            "start_end": (r"start time (\d+\.*\d*), end time (\d+\.*\d*)", START_END)}
REGEX_ALPHABET = list("0123456789..  -\t\n:,a") + [" to ", "to", "start time ", ", end time ", "\u0663", "\u2003"]


class HashModel:
    """Stands in for MiniLM where thousands of answers need the similarity fallback (the real model
    takes about 0.1 s a string on 2 cores): a unit vector per string, from its CRC. The Embedder
    around it is the real one, so its checks (a lone surrogate is Unscorable) still run."""

    def encode(self, texts, show_progress_bar=False):
        vecs = np.stack([np.random.default_rng(zlib.crc32(t.encode("utf-8"))).standard_normal(384) for t in texts])
        return (vecs / np.linalg.norm(vecs, axis=1, keepdims=True)).astype(np.float32)


class HashEmbedder(Embedder):
    def model(self):
        return HashModel()


class PlainCaptionScorers:
    """Stands in for the Java tools (PTB tokenizer, METEOR) in the fuzz: whitespace tokens, every
    caption metric 0. Parsing, localisation and pairing run for real; the Java tools run on odd
    characters in test_scoring.py's fuzz and in test_scoring_inputs.py."""

    def __init__(self, embed):
        self.embed = embed

    def tokenize(self, sentences):
        return {k: [" ".join(v.lower().split())] for k, v in sentences.items()}

    def video(self, gts, res, vectors):
        return dict.fromkeys(CAPTION_KEYS, 0.0)


def rec(task, a, **kw):
    return {"task": task, "source": kw.pop("source", "src"), "video": kw.pop("video", "v.mp4"), "a": a, **kw}


# ---------------------------------------------------------------------------------------------
# Answers the official scripts crash on or turn NaN: Failed

@pytest.mark.parametrize("answer,tgt", [(f"{BIG} - {BIG}", [10, 20]),    # float32 inf - inf: NaN IoU
                                        (f"{HUGE} - {HUGE}", [10, 20]),  # float64 inf
                                        ("5 - 5", [5, 5])])              # two points: 0 / 0
def test_a_nan_iou_is_failed(answer, tgt):
    good = rec("tvg", "10 - 20", tgt=[10, 20])
    for out in (score_tvg([good, rec("tvg", answer, tgt=tgt)]),
                score_tvg([rec("tem", "10 - 20", tgt=[[10, 20]]), rec("tem", answer, tgt=[tgt])], tem=True),
                d2vlm_tvg([good | {"a": "</evi>10 - 20"}, rec("tvg", "</evi>" + answer, tgt=tgt)])):
        assert out["Failed"] == 1 and out["mIoU"] == 0.5  # the good one's IoU 1 over 2 samples
    evidence = d2vlm_tvg([rec("tvg", f"{answer}</evi>10 - 20", tgt=tgt)])  # a NaN evidence IoU too
    assert evidence["Failed"] == 1 and evidence["mIoU_evi"] == 0


def test_tal_with_a_nan_iou():
    nan_only = score_tal([rec("tal", f"{BIG} - {BIG}", tgt=[[0, 10]])])  # official: 0 / 0
    assert nan_only["Failed"] == 1 and nan_only["F1"] == 0
    # a NaN beside a perfect span hides that span's row: recall 0, precision 1/2, F1 0 (official too)
    mixed = score_tal([rec("tal", f"0 - 10, {BIG} - {BIG}", tgt=[[0, 10]])])
    assert mixed["Failed"] == 0 and mixed["F1"] == 0


def test_lone_surrogates_and_sixth_options_are_failed():
    embed = HashEmbedder()
    first = rec("rar", "(B)", o=OPTIONS[:4], p=1)  # the group's letter map: a-d
    mcq = [first, rec("rar", "\ud800 a man cooks", o=OPTIONS[:4], p=1),   # the tokenizer rejects it
           rec("rar", "the man cooks", o=OPTIONS, p=1)]                     # a sixth option: official IndexError
    for out in (score_mcq(mcq, embed), score_mcq(mcq, embed, strict=True), d2vlm_mcq(mcq, embed)):
        assert out["Total"] == 3 and out["Failed"] == 2 and out["Acc"] == pytest.approx(1 / 3)
    gvq = [rec("gvq", "\udfff", o=OPTIONS[:4], p=1, tgt=[0, 10]), rec("gvq", "the man", o=OPTIONS, p=1, tgt=[0, 10])]
    for out in (score_gvq(gvq, embed), d2vlm_gvq(gvq, embed)):
        assert out["Failed"] == 2 and out["Acc"] == 0
    with pytest.raises(Unscorable):  # the real Embedder checks before its model loads
        closest_option("\ud800", OPTIONS[:4], Embedder())


# ---------------------------------------------------------------------------------------------
# The regexes: the official matches, in linear time

def _matches(pattern, text):
    return [(m.span(), m.groups()) for m in re.finditer(pattern, text)]


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_regexes_match_as_the_official_ones(name):
    official, ours = OFFICIAL[name]
    rng = random.Random(SEED)
    for _ in range(20000):  # short strings: the official pattern is fast there
        text = "".join(rng.choice(REGEX_ALPHABET) for _ in range(rng.randint(0, 25)))
        assert _matches(ours, text) == _matches(official, text), repr(text)


def test_captions_cut_as_the_official_replace_loop():
    """Each matched "s - e" string is cut out everywhere, one after another (a repeat is skipped
    only when it cannot match again): the captions equal the official loop's."""
    rng = random.Random(SEED)
    checked = 0
    for _ in range(20000):
        text = "".join(rng.choice(list("12- \n.") + [" cut the onion", " fry it"]) for _ in range(rng.randint(1, 14)))
        matches = PAIR.findall(text)
        rest = text
        for m in re.findall(r"(\d+\.*\d*\s*-\s*\d+\.*\d*)", text):  # the official loop
            rest = rest.replace(m, "\n")
        caps = _captions(rest.replace("seconds", "").split("\n"))
        n = min(len(matches), len(caps))
        if n == 0 or any(".." in s + e for s, e in matches):
            continue  # the fallback, or a number float() rejects: not this rule
        assert dvc_format(text)[1] == caps[:n], repr(text)
        checked += 1
    assert checked > 1000


def _seconds(f, text):
    """The best of 3 timings of f(text)."""
    best = math.inf
    for _ in range(3):
        t = time.perf_counter()
        f(text)
        best = min(best, time.perf_counter() - t)
    return best


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_regexes_are_linear(name):
    """10x the digits take about 10x the time (the official patterns: about 1000x)."""
    ours = OFFICIAL[name][1]
    for unit in ("1", "1.", "1 ", "1 - "):
        small, large = (_seconds(ours.findall, unit * n) for n in (20_000, 200_000))
        assert large < 30 * small + 0.01, (unit, small, large)


def test_a_long_number_is_scored_in_well_under_a_second():
    digits = "1" * 2000  # what a model that repeats "1" writes
    embed = HashEmbedder()
    for protocol in PROTOCOLS:
        for task in HEADLINE:
            r = _fuzz_record(random.Random(SEED), task, "0", f"{digits}</evi>{digits}")
            t = time.perf_counter()
            score_etbench([r], protocol, embed=embed, scorers=PlainCaptionScorers(embed))
            assert time.perf_counter() - t < 1, (protocol, task)
    t = time.perf_counter()
    score_charades([rec("tvg", f"{digits}</evi>{digits}", source="charades_sta", tgt=[0, 1], idx=0)], {0: [0, 1]})
    assert time.perf_counter() - t < 1


# ---------------------------------------------------------------------------------------------
# The fuzz

PIECES = ["10...", "5 - ", "- 3", " to ", "start", "ends", "happens in", "(", ")", "(B)", "b)", "f)", "best option:",
          "\n", "\r", "\x00", "\u2028", "seconds", ":", "1:30", "00:01:", ".", ",", " ", "1e9", "inf", "nan", "-",
          "</evi>", "</EVI>", "<evi>", "é", "12", "3.5", "0 - 0", BIG, HUGE, "\ud800", "\udfff", "start time: ",
          "end time: ", "description: ", "* ", "start time 5, end time 9", "a red square", "a man cooks pasta"]


NUMBERS = ["0", "5", "10", "12.5", "20", "35.", "99", "10...", BIG, HUGE]


def _answer(rng):
    """Junk, or a well-formed answer (spans, a letter, captions, with or without evidence) with odd
    numbers and junk around it."""
    def junk(n):
        return "".join(rng.choice(PIECES) for _ in range(rng.randint(0, n)))

    def span():
        return f"{rng.choice(NUMBERS)} - {rng.choice(NUMBERS)}"

    forms = [lambda: junk(12),
             lambda: f"The event happens in {span()}, {span()} seconds.",
             lambda: f"({rng.choice('ABCDEF')}) {rng.choice(OPTIONS)}",
             lambda: f"{span()} seconds, a red square appears.\n{span()} seconds, a blue circle.",
             lambda: f"{span()}, {span()}</evi>{span()} seconds, {rng.choice(OPTIONS)}."]
    return junk(2) + rng.choice(forms)() + junk(2)


def _fuzz_record(rng, task, video, answer):
    """An E.T.Bench record of `task` with random ground truth: sometimes zero-length spans, VHD with
    and without annotators, 3 to 6 options."""
    s = sorted(rng.choice([0.0, 5.0, 10.0, rng.uniform(0, 100)]) for _ in range(2))
    r = rec(task, answer, video=f"v{video}.mp4", source=rng.choice(["s1", "s2"]))
    if task in ONE_SPAN_TASKS:
        r["tgt"] = s
    elif task == "vhd":
        r["tgt"] = [[s]] if rng.random() < 0.5 else [s]
    elif task not in MCQ_TASKS:
        r["tgt"] = [s, [s[1], s[1] + 5]]
    if task in OPTION_TASKS:
        r["o"] = OPTIONS[:rng.choice([3, 6] + [4, 5] * 5)]
        r["p"] = rng.randrange(len(r["o"]))
    if task in CAPTION_TASKS:
        r["g"] = ["a red square appears", "a blue circle"]
    return r


def _finite(metrics):
    return all(math.isfinite(v) for srcs in metrics.values() for m in srcs.values() for v in m.values())


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_fuzz_every_task_never_raises(protocol):
    rng = random.Random(SEED)
    recs = [_fuzz_record(rng, rng.choice(list(HEADLINE)), str(i % 40), _answer(rng)) for i in range(FUZZ_ANSWERS)]
    embed = HashEmbedder()
    t = time.perf_counter()
    out = score_etbench(recs, protocol, embed=embed, scorers=PlainCaptionScorers(embed))
    assert time.perf_counter() - t < FUZZ_SECONDS
    assert set(out) == set(HEADLINE) and _finite(out)
    assert sum(m["Total"] for srcs in out.values() for m in srcs.values()) == FUZZ_ANSWERS
    assert all(0 <= m["Failed"] <= m["Total"] for srcs in out.values() for m in srcs.values())


def test_fuzz_charades_never_raises():
    rng = random.Random(SEED)
    truth = {i: sorted(rng.uniform(0, 30) for _ in range(2)) for i in range(50)}
    recs = [rec("tvg", _answer(rng), source="charades_sta", tgt=[0, 1], idx=rng.randrange(60)) for _ in range(2000)]
    out = score_charades(recs, truth)
    assert all(math.isfinite(v) for v in out.values()) and out["Failed"] + out["num"] == out["Total"]
