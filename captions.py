"""Dense captioning: the official parsers and the DVC / SLC scorer (scoring-spec.md §1.11, §2, §4).

    dvc_format(a)           -> (spans, captions) | None       the official parse, with its fallback
    dvc_format_d2vlm(a)     -> (spans, captions) | None       the D2VLM release's: the answer after </evi>
    CaptionScorers(embed)   PTB tokenizer, Bleu, METEOR (one Java process), ROUGE-L, CIDEr, SentSim
    score_dvc(samples, scorers, seed, d2vlm)                  -> {"Total", "Failed", F1@t, F1, CAPTION_KEYS...}

spans: [[s, e], ...] seconds with s <= e; captions: one string per span. YouCook2's scorer
(charades_youcook2.py) uses the same parser and scorers.
"""
from __future__ import annotations

import math
import random
import re
from collections import defaultdict

import numpy as np

from evidence import EVI_END
from scoring import (NUMBER, PAIR, THRESHOLDS, Embedder, Unparsable, dense_iou, parse_float, random_caption,
                     written_pairs)

CAPTION_KEYS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SentSim")
MAX_SEGMENTS = 1000  # the official scorer keeps a video's first 1000 segments
FALLBACK_WINDOW = 40  # seconds: one time t in the fallback becomes [t - 20, t + 20], or [t, t + 40] near 0
MIN_CAPTION = 5  # a caption piece must be longer than this (before stripping)
MIN_FALLBACK_PIECE = 7  # a fallback piece must be longer than this
# official r"\d+\.*\d*:\d+\.*\d*" (m:ss) and r"start time (\d+\.*\d*), end time (\d+\.*\d*)", without
# their backtracking (see scoring.NUMBER): the same matches, in linear time
CLOCK = re.compile(rf"(?<!\d){NUMBER}:{NUMBER}")
START_END = re.compile(rf"start time ({NUMBER}), end time ({NUMBER})")


def _big(x):
    """float(x), with an int too large for a float becoming inf (as the official arithmetic ends up)."""
    try:
        return float(x)
    except OverflowError:
        return math.inf if x > 0 else -math.inf


def _around(t):
    """One time -> a 40-second window (as the official fallback): [t - 20, t + 20], or [t, t + 40] near 0."""
    half = FALLBACK_WINDOW // 2  # an int: a huge int time must reach _big unconverted
    return [t - half, t + half] if t > half else [t, t + FALLBACK_WINDOW]


def _time_part(text):
    """A span from one piece of a caption-only response (the fallback of spec §1.11), or None when
    the official code would raise on this piece (it then moves on to the next piece)."""
    m = PAIR.search(text)
    if m:
        return [parse_float(m.group(1)), parse_float(m.group(2))]
    clock = CLOCK.findall(text)  # m:ss; what counts is the number of ':' in the text
    if text.count(":") in (1, 2):
        if len(clock) != text.count(":"):
            return None
        try:  # official: int() of minutes and seconds, so "3:57." or "5:30.5" make the piece fail
            times = [int(mi) * 60 + int(se) for mi, se in (c.split(":") for c in clock)]
        except ValueError:
            return None
        return [_big(t) for t in (_around(times[0]) if len(times) == 1 else times)]
    nums = [parse_float(x) for x in re.findall(r"\d+\.*\d*(?!\.)", text)]
    if len(nums) == 1:
        return _around(nums[0])
    if len(nums) == 2:
        return nums  # in text order; ordered later
    return None  # none, or three and more numbers


def _captions(pieces):
    """Pieces longer than 5 characters (before stripping), stripped as the official parser does."""
    return [c.strip().strip(", ").rstrip() for c in pieces if len(c) > MIN_CAPTION]


def dvc_format(a: str):
    """(spans, captions) of a dense-captioning response, or None (spec §1.11)."""
    return _dvc_parse(a.lower(), a)


def dvc_format_d2vlm(a: str):
    """The D2VLM release's parse of a dense-captioning response (spec §2, §4): the answer is the text
    between the first and the second </evi>, lowercased, runs of dots turned into a space; the
    fallback reads the whole original response. None without a delimiter or when nothing parses."""
    paras = a.split(EVI_END)
    if len(paras) < 2:
        return None
    return _dvc_parse(re.sub(r"\.{2,}", " ", paras[1].lower()), a)


def _dvc_parse(p, original):
    """dvc_format on lowercased text p; the one-segment fallback reads `original`. A number that
    does not parse in the paragraph step makes the whole response fail (official: caught, None)."""
    a = original
    matches = list(PAIR.finditer(p))
    try:
        spans = [[parse_float(m.group(1)), parse_float(m.group(2))] for m in matches]
    except Unparsable:
        return None
    rest, done = p, set()
    for m in matches:  # official: each matched "s - e" string replaced everywhere, one after another
        if m.group(0) not in done:
            rest = rest.replace(m.group(0), "\n")
            if "\n" not in m.group(0):  # then no new copy can appear, and a repeat replaces nothing
                done.add(m.group(0))
    caps = _captions(rest.replace("seconds", "").split("\n"))
    if not matches:
        starts = re.findall(r"start(?:ing)? time: (\d+\.*\d*)", p)
        ends = re.findall(r"end(?:ing)? time: (\d+\.*\d*)", p)
        try:
            spans = [[parse_float(x), parse_float(y)] for x, y in zip(starts, ends)]
        except Unparsable:
            return None
        caps = _captions(re.findall(r"description: (.*)", p) or re.findall(r"\*\s*(.*)", p))
        if not spans and START_END.search(p):
            return None  # official: a failing assert, caught; the sample is Failed
    n = min(len(spans), len(caps))
    spans, caps = spans[:n], caps[:n]
    if not spans:  # one segment at most, from the original text
        pieces = [x for x in a.split("\n") if len(x) > MIN_FALLBACK_PIECE] if "\n" in a \
            else [x + "." for x in a.split(".") if len(x) > MIN_FALLBACK_PIECE]
        for piece in pieces:
            parts = [x.strip(",") for x in piece.split("seconds")]
            try:
                span = _time_part(parts[0])
            except Unparsable:
                span = None
            if span is not None:
                spans, caps = [[round(span[0], 2), round(span[1], 2)]], [parts[-1].strip()]
                break
    if not spans:
        return None
    return [[min(s, e), max(s, e)] for s, e in spans], caps


class CaptionScorers:
    """pycocoevalcap's PTB tokenizer, Bleu(4), METEOR 1.5 (one Java process), ROUGE-L, CIDEr, and
    SentSim (dot product of the given scoring.Embedder's vectors over the tokenized pairs), as
    DVCEval uses them."""

    def __init__(self, embed: Embedder):
        try:
            from pycocoevalcap.bleu.bleu import Bleu
            from pycocoevalcap.cider.cider import Cider
            from pycocoevalcap.meteor.meteor import Meteor
            from pycocoevalcap.rouge.rouge import Rouge
            from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
        except ImportError as e:
            raise SystemExit(f"caption scoring needs pycocoevalcap 1.2 and Java ({e}); pip install -r requirements.txt") from None
        import shutil
        if shutil.which("java") is None:
            raise SystemExit("caption scoring (dvc, slc) needs Java on PATH for the PTB tokenizer and METEOR")
        self.embed = embed
        self.tokenizer, self.bleu, self.rouge, self.cider = PTBTokenizer(), Bleu(4), Rouge(), Cider()
        self.meteor = Meteor()

    def tokenize(self, sentences: dict) -> dict:
        """{key: sentence} -> {key: [tokenized sentence]}."""
        import os
        saved = os.dup(2)  # the Java tokenizer reports its speed on the process's stderr
        try:
            with open(os.devnull, "w") as null:
                os.dup2(null.fileno(), 2)
                return self.tokenizer.tokenize({k: [{"caption": v}] for k, v in sentences.items()})
        finally:
            os.dup2(saved, 2)
            os.close(saved)

    def video(self, gts, res):
        """gts, res: {pair id: [tokenized sentence]} of one video -> {metric: value} over CAPTION_KEYS."""
        import contextlib
        import io
        with contextlib.redirect_stdout(io.StringIO()):
            bleu, _ = self.bleu.compute_score(gts, res, verbose=0)
        out = {f"Bleu_{i + 1}": b for i, b in enumerate(bleu)}
        out["METEOR"], _ = self.meteor.compute_score(gts, res)
        out["ROUGE_L"], _ = self.rouge.compute_score(gts, res)
        out["CIDEr"], _ = self.cider.compute_score(gts, res)
        keys = list(gts)
        g = self.embed.batch([gts[k][0] for k in keys])
        r = self.embed.batch([res[k][0] for k in keys])
        out["SentSim"] = float(np.mean(np.sum(g * r, 1)))
        return out


def localisation(pairs, scale, suffix=""):
    """F1{suffix}@t and F1{suffix} from (gt spans, predicted spans) per parsed video: P and R at
    IoU > t, averaged over the videos, times `scale`. A video without predicted spans has P = 0."""
    out, f1s = {}, []
    for t in THRESHOLDS:
        P, R = [], []
        for gt, spans in pairs:
            iou = [[dense_iou(g, p) for p in spans] for g in gt]
            P.append(sum(any(row[p] > t for row in iou) for p in range(len(spans))) / len(spans) if spans else 0.0)
            R.append(sum(any(x > t for x in row) for row in iou) / len(iou))
        p, r = float(np.mean(P)) * scale, float(np.mean(R)) * scale
        out[f"F1{suffix}@{t}"] = 0.0 if p + r == 0 else 2 * p * r / (p + r)
        f1s.append(out[f"F1{suffix}@{t}"])
    out[f"F1{suffix}"] = sum(f1s) / len(f1s)
    return out


def pair_captions(videos, t, rng):
    """videos: {video: (gt spans, gt captions, [(span, caption), ...] predicted)} -> (gts, preds,
    by_video): every prediction paired with each ground truth at dense IoU >= t, or with one
    random_caption(rng) when none is; gts, preds: {pair key: caption}; by_video: {video: [pair keys]}."""
    gts, preds, by_video = {}, {}, defaultdict(list)
    for v, (spans, refs, predictions) in videos.items():
        for p, cap in predictions:
            matched = [refs[g] for g, gs in enumerate(spans) if dense_iou(gs, p) >= t]
            for ref in matched or [random_caption(rng)]:
                k = str(len(gts))
                gts[k], preds[k] = ref, cap
                by_video[v].append(k)
    return gts, preds, by_video


def _evidence_spans(a):
    """The D2VLM scripts' evidence spans: "s - e" pairs before the delimiter (not reordered)."""
    return written_pairs(re.sub(r"\.{2,}", " ", a.split(EVI_END)[0].lower()))


def _ascii(text):
    return "".join(c if ord(c) < 128 else " " for c in text)


def score_dvc(samples, scorers: CaptionScorers, seed=0, d2vlm=False):
    """DVC, SLC (spec §1.11): localisation P/R at IoU > t over parsed videos, scaled by parsed/Total;
    caption metrics over (pred, gt) pairs at IoU >= t, per video, averaged over parsed videos.
    samples: records with "tgt" [[s, e], ...] and one caption per span in "g". seed: the random
    captions of unmatched predictions. d2vlm: the answer is the text after the first </evi> (spec
    §2) and F1_evi@t / F1_evi score the evidence spans before it (no fallback to the answer's)."""
    total, parsed = len(samples), {}
    n_parsed = 0
    for s in samples:
        try:
            out = dvc_format_d2vlm(s["a"]) if d2vlm else dvc_format(s["a"])
            evi = _evidence_spans(s["a"]) if d2vlm and out is not None else []
        except Unparsable:  # d2vlm evidence with "10...": the release crashes
            out = None
        if out is None:
            continue
        n_parsed += 1
        spans, caps = out
        parsed[s["video"]] = (s, spans[:MAX_SEGMENTS], caps[:MAX_SEGMENTS], evi)  # keyed by video: a repeat overwrites
    res = {"Total": total, "Failed": total - n_parsed}
    if not parsed:  # official: integer zeros
        res.update({f"F1@{t}": 0 for t in THRESHOLDS}, F1=0)
        if d2vlm:
            res.update({f"F1_evi@{t}": 0 for t in THRESHOLDS}, F1_evi=0)
        res.update({k: 0 for k in CAPTION_KEYS})
        return res
    scale = len(parsed) / total  # unique parsed videos
    res.update(localisation([(s["tgt"], spans) for s, spans, _, _ in parsed.values()], scale))
    if d2vlm:
        res.update(localisation([(s["tgt"], evi) for s, _, _, evi in parsed.values()], scale, "_evi"))
    videos = {v: (s["tgt"], [_ascii(g) for g in s["g"]], [(p, _ascii(c)) for p, c in zip(spans, caps)])
              for v, (s, spans, caps, _) in parsed.items()}
    rng = random.Random(seed)  # official: unseeded random strings for unmatched captions
    per_t = defaultdict(list)
    for t in THRESHOLDS:
        gts, preds, by_video = pair_captions(videos, t, rng)
        tg, tp = scorers.tokenize(gts), scorers.tokenize(preds)
        for v in videos:
            ks = by_video[v]
            vals = scorers.video({k: tg[k] for k in ks}, {k: tp[k] for k in ks}) if ks else dict.fromkeys(CAPTION_KEYS, 0.0)
            for m in CAPTION_KEYS:
                per_t[m].append((t, vals[m]))
    for m in CAPTION_KEYS:
        res[m] = float(np.mean([np.mean([x for tt, x in per_t[m] if tt == t]) for t in THRESHOLDS]))
    return res
