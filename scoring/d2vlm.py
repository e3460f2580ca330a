"""The D2VLM release's E.T.Bench protocol (new_compute_metrics.py --delimiter v3; docs/scoring-rules.md#the-four-etbench-scripts).

A response is "<evidence></evi><answer>": the answer after the delimiter is scored as the original
protocol would, and the evidence before it adds *_evi metrics. The release's bugs are reproduced
(and named where they happen). Dense captioning under this protocol is captions.score_dvc(d2vlm=True).

    tvg_format_d2vlm(a)                 -> (answer spans | None, evidence spans | None)
    d2vlm_tvg, d2vlm_tal, d2vlm_evs, d2vlm_vhd, d2vlm_mcq, d2vlm_gvq    samples -> {metric: value}

samples: one (task, source) group of E.T.Bench records with the response in "a". A sample whose
answer or evidence IoU is NaN, or that the release would crash on, is Failed (rules.Unscorable).
"""
from __future__ import annotations

import math

from evidence import EVI_END
from scoring.rules import (THRESHOLDS, Unparsable, Unscorable, at_thresholds, best_iou, closest_option, evs_f1,
                           letter_choice, letter_map, lone_letter, strip_best_option, temporal_iou, tvg_format,
                           written_pairs)

EPS = 1e-7  # the release's guard in "correct ratio within matched"


def tvg_format_d2vlm(a: str):
    """(answer spans, evidence spans) of a response, each None when absent. The response is
    lowercased and split at the delimiter (answer: the last part; evidence: the first). The answer
    goes through tvg_format with float(x.rstrip('.')); the evidence takes "s - e" pairs only, unordered."""
    parts = a.lower().split(EVI_END)
    if len(parts) < 2:
        return None, None
    try:
        answer = tvg_format(parts[-1], rstrip_dots=True)
    except Unparsable:  # official: a crash
        answer = None
    try:
        evidence = written_pairs(parts[0]) or None
    except Unparsable:
        evidence = None
    return answer, evidence


def _ious(gt, answer, evidence):
    """[answer IoU, evidence IoU] (best_iou of each span list against gt), or None when the sample
    is Failed: no answer span, or a NaN IoU (official: a NaN mIoU / mIoU_evi)."""
    try:
        return [best_iou(gt, spans) for spans in (answer, evidence)] if answer else None
    except Unscorable:
        return None


def d2vlm_tvg(samples, tem=False):
    """TVG/EPM: the best IoU over all answer spans (and over all evidence spans; no evidence: the
    answer's). tem=True: TEM, the first answer / evidence span's best IoU over the gt spans."""
    total, failed = len(samples), 0
    sums, hits = [0.0, 0.0], [[0] * len(THRESHOLDS), [0] * len(THRESHOLDS)]
    for s in samples:
        ans, evi = tvg_format_d2vlm(s["a"])
        evi = evi or ans
        if tem and ans:  # the first span of each, against every gt span
            ans, evi = ans[:1], evi[:1]
        ious = _ious(s["tgt"] if tem else [s["tgt"]], ans, evi)
        if ious is None:
            failed += 1
            continue
        for k, iou in enumerate(ious):
            sums[k] += iou
            for i, t in enumerate(THRESHOLDS):
                hits[k][i] += iou >= t
    out = {"Total": total, "Failed": failed, "mIoU": sums[0] / total, "mIoU_evi": sums[1] / total}
    name = "R" if tem else "F1"
    rates, mean = at_thresholds(name, hits[0], total)
    rates_evi, mean_evi = at_thresholds(f"{name}_evi", hits[1], total)
    if tem:  # the release's key orders
        out.update({**rates, **rates_evi, "mRec": mean, "mRec_evi": mean_evi})
    else:
        out.update({**rates, "F1": mean, **rates_evi, "F1_evi": mean_evi})
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
    rates, mean = at_thresholds("F1", f1, total)
    rates_evi, mean_evi = at_thresholds("F1_evi", f1e, total)
    return {"Total": total, "Failed": failed, **rates, **rates_evi, "F1": mean, "F1_evi": mean_evi}


def _painted(ans, evi):
    """The spans the release paints for EVS, in its order: the answer's, then the evidence's. A span
    with an infinite end is deleted from `ans` inside the loop, so the span after it is skipped, and
    an `evi` that is the same list loses it too; its start is still rounded first (inf: a crash)."""
    i = 0
    while i < len(ans):
        a, b = ans[i]
        if math.isinf(b):
            round(a)  # raises on an infinite start, as the release's max(0, round(a)) does
            del ans[i]
            i += 1  # the list shifted under the loop: the next span is skipped
            continue
        yield a, b
        i += 1
    yield from evi


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
        try:
            f1s.append(evs_f1(s["tgt"], _painted(ans, evi or ans)))  # no evidence: the same list
        except (OverflowError, ValueError):  # official: a crash
            failed += 1
    f1 = sum(f1s) / len(f1s) if f1s else 0
    return {"Total": total, "Failed": failed, "F1": f1, "F1_evi": f1}


def d2vlm_vhd(samples):
    """VHD: the midpoint of the answer's first span (a bare number no longer parses); the evidence:
    the midpoint of its first span, else the answer's. The split is case-sensitive here."""
    total, failed, hits = len(samples), 0, [0, 0]
    for s in samples:
        parts = s["a"].split(EVI_END)
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


def d2vlm_mcq(samples, embed):
    """RAR/ECA/RVQ: the text after the delimiter; the "(x)" rule is dead code in the release; a
    leading letter in the map decides; anything else goes to the similarity fallback (embed: a
    scoring.Embedder) and is Failed."""
    total, failed, hits, weak, weak_correct = len(samples), 0, 0, 0, 0
    letters = letter_map(samples)
    for s in samples:
        parts = s["a"].split(EVI_END)
        pred = strip_best_option((parts[-1] if len(parts) > 1 else s["a"]).lower())
        if letters is None or not pred:
            failed += 1
            continue
        letter = lone_letter(pred)
        if letter is not None and letter in letters:
            weak += 1
            ok = letters.index(letter) == s["p"]
            hits += ok
            weak_correct += ok
            continue
        failed += 1  # the fallback is Failed whatever it picks
        try:
            hits += closest_option(pred, s["o"], embed) == s["p"]
        except Unscorable:  # official: a crash; a miss here
            continue
    return {"Total": total, "Failed": failed, "Acc": hits / total, "Matched_count": weak,
            "matched_ratio": weak / total, "correct_ratio_within_matched": weak_correct / (weak + EPS)}


def d2vlm_gvq(samples, embed):
    """GVQ: the multiple-choice part on the text after the delimiter (as the original), counting
    letter matches; grounding of correct answers from the first answer span; the evidence's first
    span, or [0, 0] when there is none. embed: a scoring.Embedder."""
    total, acc_cnt, rec_cnt, correct_n, weak, weak_correct = len(samples), 0, 0, 0, 0, 0
    sums, hits = [0.0, 0.0], [[0] * len(THRESHOLDS), [0] * len(THRESHOLDS)]
    for s in samples:
        pred = strip_best_option(s["a"].split(EVI_END)[-1])
        if not pred:
            acc_cnt += 1
            continue
        choice = letter_choice(pred, len(s["o"]))
        if choice is not None:
            weak += 1
            correct = choice == s["p"]
            weak_correct += correct
        else:
            try:
                correct = closest_option(pred, s["o"], embed) == s["p"]
            except Unscorable:  # official: a crash
                acc_cnt += 1
                continue
        if not correct:
            continue
        correct_n += 1
        ans, evi = tvg_format_d2vlm(s["a"])
        ious = _ious([s["tgt"]], ans[:1], evi[:1] if evi else [[0.0, 0.0]]) if ans else None
        if ious is None:
            rec_cnt += 1
            continue
        for k, iou in enumerate(ious):
            sums[k] += iou
            for i, t in enumerate(THRESHOLDS):
                hits[k][i] += iou >= t
    rates, mean = at_thresholds("R", hits[0], total)
    rates_evi, mean_evi = at_thresholds("R_evi", hits[1], total)
    return {"Total": total, "Failed": rec_cnt + acc_cnt, "mIoU": sums[0] / total, "mIoU_evi": sums[1] / total,
            **rates, **rates_evi, "mRec": mean, "mRec_evi": mean_evi, "Acc": correct_n / total,
            "Matched count": weak, "Matched ratio": weak / total, "correct count within matched": weak_correct,
            "correct ratio within matched": weak_correct / (weak + EPS)}
