"""Dense captioning: the official parsers and the DVC / SLC scorer (docs/scoring-rules.md#dvc-and-slc§2, §4).

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
from scoring.rules import (NUMBER, PAIR, THRESHOLDS, Embedder, Unparsable, dense_iou, parse_float, random_caption,
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
    """A span from one piece of a caption-only response (the fallback of docs/scoring-rules.md#dvc-and-slc), or None when
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
    """(spans, captions) of a dense-captioning response, or None (docs/scoring-rules.md#dvc-and-slc)."""
    return _dvc_parse(a.lower(), a)


def dvc_format_d2vlm(a: str):
    """The D2VLM release's parse of a dense-captioning response (docs/scoring-rules.md#the-four-etbench-scripts, docs/scoring-rules.md#youcook2): the answer is the text
    between the first and the second </evi>, lowercased, runs of dots turned into a space; the
    fallback reads the whole original response. None without a delimiter or when nothing parses."""
    paras = a.split(EVI_END)
    if len(paras) < 2:
        return None
    return _dvc_parse(re.sub(r"\.{2,}", " ", paras[1].lower()), a)


def cut_pairs(text: str, pairs) -> str:
    """text with each of `pairs` (the matched "s - e" strings, in text order) replaced by a newline
    everywhere, one string after another, as the official loop does with str.replace (which takes
    strings x length steps: 4,000 segments of a 133 KB answer, 0.4 s; 16,000, 5 s). Here in one pass:
    every occurrence of every distinct string is found at once (_occurrences), then each string in
    turn takes, left to right, those of its occurrences that no string before it took, which is what
    its str.replace finds in the text the earlier ones left. A string holding a newline can also meet
    copies of itself made by the newlines put in before it; an answer with one (a pair broken across
    lines) takes the official loop."""
    distinct = list(dict.fromkeys(pairs))
    if any("\n" in w for w in distinct):
        for w in pairs:
            text = text.replace(w, "\n")
        return text
    taken, cuts = bytearray(len(text)), []
    for w, starts in zip(distinct, _occurrences(text, distinct)):
        end = 0
        for x in starts:
            if x >= end and taken.find(1, x, x + len(w)) < 0:
                end = x + len(w)
                taken[x:end] = b"\1" * len(w)
                cuts.append((x, end))
    out, last = [], 0
    for x, end in sorted(cuts):
        out += [text[last:x], "\n"]
        last = end
    return "".join(out + [text[last:]])


def _occurrences(text: str, strings) -> list:
    """For each of the distinct `strings`, the start of every occurrence in text (overlapping ones
    too), in order: one pass of an Aho-Corasick automaton over text. Its tables are flat lists and one
    dict keyed by int (node and character), so that building it makes no object per node."""
    goto, parent, char, ends = {}, [0], [0], [-1]  # (node << 21 | code point) -> child; which string ends at a node
    for i, w in enumerate(strings):
        node = 0
        for ch in w:
            key = node << 21 | ord(ch)
            if key not in goto:
                goto[key] = len(parent)
                parent.append(node)
                char.append(ord(ch))
                ends.append(-1)
            node = goto[key]
        ends[node] = i
    fail, link = [0] * len(parent), [0] * len(parent)  # link: the nearest node down the fail chain that ends a string
    depth = [0] * len(parent)
    for node in range(1, len(parent)):  # a child is made after its parent
        depth[node] = depth[parent[node]] + 1
    for node in sorted(range(1, len(parent)), key=depth.__getitem__):  # breadth first
        f = fail[parent[node]] if parent[node] else 0
        while parent[node] and f and (f << 21 | char[node]) not in goto:
            f = fail[f]
        fail[node] = goto.get(f << 21 | char[node], 0) if parent[node] else 0
        link[node] = fail[node] if ends[fail[node]] >= 0 else link[fail[node]]
    found, node = [[] for _ in strings], 0
    for pos, ch in enumerate(text):
        c = ord(ch)
        while node and (node << 21 | c) not in goto:
            node = fail[node]
        node = goto.get(node << 21 | c, 0)
        m = node
        while m:
            if ends[m] >= 0:
                found[ends[m]].append(pos - len(strings[ends[m]]) + 1)
            m = link[m]
    return found


def _dvc_parse(p, original):
    """dvc_format on lowercased text p; the one-segment fallback reads `original`. A number that
    does not parse in the paragraph step makes the whole response fail (official: caught, None)."""
    a = original
    matches = list(PAIR.finditer(p))
    try:
        spans = [[parse_float(m.group(1)), parse_float(m.group(2))] for m in matches]
    except Unparsable:
        return None
    caps = _captions(cut_pairs(p, [m.group(0) for m in matches]).replace("seconds", "").split("\n"))
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

    def video(self, gts, res, vectors):
        """gts, res: {pair id: [tokenized sentence]} of one video -> {metric: value} over CAPTION_KEYS.
        vectors: {sentence: its Embedder vector} holding every sentence of gts and res."""
        import contextlib
        import io
        with contextlib.redirect_stdout(io.StringIO()):
            bleu, _ = self.bleu.compute_score(gts, res, verbose=0)
        out = {f"Bleu_{i + 1}": b for i, b in enumerate(bleu)}
        out["METEOR"], _ = self.meteor.compute_score(gts, res)
        out["ROUGE_L"], _ = self.rouge.compute_score(gts, res)
        out["CIDEr"], _ = self.cider.compute_score(gts, res)
        keys = list(gts)
        g = np.stack([vectors[gts[k][0]] for k in keys])
        r = np.stack([vectors[res[k][0]] for k in keys])
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
    """DVC, SLC (docs/scoring-rules.md#dvc-and-slc): localisation P/R at IoU > t over parsed videos, scaled by parsed/Total;
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
    rounds = []
    for t in THRESHOLDS:
        gts, preds, by_video = pair_captions(videos, t, rng)
        rounds.append((t, scorers.tokenize(gts), scorers.tokenize(preds), by_video))
    # SentSim's vectors: each distinct sentence encoded once for every threshold and video (the official
    # scorer encodes each pair's sentences again at each threshold: the same vectors, four times the time)
    vectors = scorers.embed.vectors(sorted({x[0] for _, tg, tp, _ in rounds for d in (tg, tp) for x in d.values()}))
    per_t = defaultdict(list)
    for t, tg, tp, by_video in rounds:
        for v in videos:
            ks = by_video[v]
            vals = (scorers.video({k: tg[k] for k in ks}, {k: tp[k] for k in ks}, vectors) if ks
                    else dict.fromkeys(CAPTION_KEYS, 0.0))
            for m in CAPTION_KEYS:
                per_t[m].append((t, vals[m]))
    for m in CAPTION_KEYS:
        res[m] = float(np.mean([np.mean([x for tt, x in per_t[m] if tt == t]) for t in THRESHOLDS]))
    return res
