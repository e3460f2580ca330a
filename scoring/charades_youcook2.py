"""Charades-STA and YouCook2 as the D2VLM release scores them in TimeChat's format (docs/scoring-rules.md#charades-sta,
docs/scoring-rules.md#youcook2).

    charades_records(path) -> tvg records;  charades_truth(path) -> {annotation id: [s, e]}
    score_charades(records, truth) -> {"Total", "Failed", "num", R1@t, "mIoU"[, "missing", "unknown", "repeated"]}
    youcook2_records(path) -> dvc records (also the ground truth of score_youcook2)
    score_youcook2(records, scorers, seed, truth) -> {metric: value, "Total", "Failed", "repeated"[, "missing", "unknown"]}
    chased_dp(scores (S, K)) -> the best order-preserving matching's total (SODA)
    score_timechat(benchmark, records, path) -> (metrics, a line counting the videos without a prediction)

records: E.T.Bench-style dicts with the response in "a"; only tvg/charades_sta, resp. dvc/youcook2
records count. The TimeChat files (path) are checked as they are read: a bad one raises ValueError
with one line naming the file, the annotation and the field.
"""
from __future__ import annotations

import random
import re
from pathlib import Path

import numpy as np

from evidence import EVI_END
from scoring.captions import CaptionScorers, dvc_format_d2vlm, pair_captions
from scoring.rules import (BadField, Embedder, Unparsable, check_span, check_spans, check_text, dense_iou, tvg_format,
                           written_pairs)
from support.files import is_number, is_text, read_json, show

# ---------------------------------------------------------------------------------------------
# TimeChat's .caption_coco_format.json


def _read_annotations(path) -> list:
    """The "annotations" list of a TimeChat file; FileNotFoundError / ValueError naming the file."""
    path = Path(path)
    doc = read_json(path, "ground-truth file")
    anns = doc.get("annotations") if isinstance(doc, dict) else None
    if not isinstance(anns, list) or not anns:
        raise ValueError(f'{path}: expected {{"annotations": [...]}} with at least one annotation '
                         "(TimeChat's .caption_coco_format.json)")
    return anns


def _annotations(path, check, key) -> list[dict]:
    """The annotations of a TimeChat file, each passed to check(annotation) (which raises BadField)
    and each key(annotation) unique; ValueError naming the file, the annotation and the field."""
    anns, seen = _read_annotations(path), {}
    for i, a in enumerate(anns):
        try:
            if not isinstance(a, dict):
                raise BadField("annotation", f"is not a JSON object: {show(a)}")
            check(a)
            k = key(a)
            if k in seen:
                raise BadField("image_id" if isinstance(k, str) else "id", f"repeats annotation {seen[k]}: {show(k)}")
            seen[k] = i
        except BadField as e:
            image = f" (image_id {show(a['image_id'])})" if isinstance(a, dict) and "image_id" in a else ""
            raise ValueError(f"{path}: annotation {i}: {e}{image}") from None
    return anns


def _require(a, fields) -> None:
    for field in fields:
        if field not in a:
            raise BadField(field, "missing")

# ---------------------------------------------------------------------------------------------
# Charades-STA (docs/scoring-rules.md#charades-sta)

CHARADES_PROMPT = ("You are given a video about indoor activities. Watch the video carefully and find a visual event "
                   "described by the sentence: '{}'. The format of your response should be: 'The event happens in "
                   "<start time> - <end time>'.")
CHARADES_THRESHOLDS = (0.3, 0.5, 0.7)


def charades_spans(a: str):
    """(evidence spans, answer spans) of a response as the release's Charades converter reads it, each
    None when absent; None when there is no delimiter. The response is lower-cased before the split
    (so "</EVI>" splits too); the answer (the last part) goes through tvg_format with plain float(),
    so "20..." raises Unparsable (the converter crashes); the evidence (the first part) is its
    "s - e" pairs as written, not reordered and with no other forms."""
    parts = a.lower().split(EVI_END)
    if len(parts) < 2:
        return None
    answer = tvg_format(parts[-1])
    return written_pairs(parts[0]) or None, answer


def _check_charades(a) -> None:
    """image_id and caption (text), timestamp ([s, e]), id (an int: what predictions match by)."""
    _require(a, ("image_id", "caption", "timestamp", "id"))
    check_text(a["image_id"], "image_id")
    check_text(a["caption"], "caption")
    check_span(a["timestamp"], "timestamp")
    if not isinstance(a["id"], int) or isinstance(a["id"], bool):
        raise BadField("id", f"is not an integer: {show(a['id'])}")


def _charades_annotations(annotation_path) -> list[dict]:
    return _annotations(annotation_path, _check_charades, key=lambda a: a["id"])


def charades_truth(annotation_path) -> dict:
    """TimeChat's Charades-STA test file -> {annotation id: [s, e]}, the ground truth the official
    scorer matches each prediction's idx against."""
    return {a["id"]: a["timestamp"] for a in _charades_annotations(annotation_path)}


def charades_records(annotation_path):
    """TimeChat's Charades-STA test file (COCO caption format) -> E.T.Bench-style tvg records, as
    the D2VLM release builds them (idx = the annotation's position; duration None)."""
    anns = _charades_annotations(annotation_path)
    return [{"idx": i, "task": "tvg", "source": "charades_sta", "video": f"charades/compressed_videos/{a['image_id']}",
             "duration": None, "tgt": a["timestamp"], "q": CHARADES_PROMPT.format(a["caption"].strip("."))}
            for i, a in enumerate(anns)]


def _charades_iou(answer, evidence, gt) -> float:
    """IoU (float64, over the hull, as the official scorer) of the first answer span, else the first
    evidence span as written, with the gt span."""
    (s, e), (gs, ge) = (answer or evidence)[0], gt
    hull = max(e, ge) - min(s, gs)
    return max(min(e, ge) - max(s, gs), 0) / hull if hull > 0 else 0.0  # official: ZeroDivisionError


def score_charades(records, truth=None):
    """R1@{0.3, 0.5, 0.7} (percent) and mIoU (fraction) of the first span of each tvg/charades_sta
    response: the answer's spans after </evi>, else the evidence's (as written: a reversed span
    scores 0). As the official scorer, the denominator is the number of responses with a span
    (`num`); IoU is over the hull, in float64. Responses the official converter crashes on (no
    </evi>, no span at all, answer spans with no evidence spans, a number like "20...") are Failed
    and left out.
    truth: {id: [s, e]} (charades_truth), as the official scorer reads it; each record then needs an
    int "idx", matched to an id. A repeated idx keeps its last record (the converter's dict:
    "repeated" counts the others); a response whose idx is not in truth counts in num with no IoU
    ("unknown", as officially); an id without a record is left out ("missing": officially it
    changes nothing, the denominator being num). Without truth each record's own "tgt" counts.
    Raises ValueError when no record is tvg/charades_sta."""
    charades = [r for r in records if r["task"] == "tvg" and r["source"] == "charades_sta"]
    if not charades:
        raise ValueError(f"no tvg/charades_sta record among the {len(records)} predictions")
    scored = list({r["idx"]: r for r in charades}.values()) if truth is not None else charades
    hits, miou, num, failed, unknown = dict.fromkeys(CHARADES_THRESHOLDS, 0), 0.0, 0, 0, 0
    for r in scored:
        try:
            parsed = charades_spans(r["a"])
        except Unparsable:  # the converter crashes on float("20...")
            parsed = None
        if parsed is None or parsed[0] is None:  # KeyError / TypeError in the converter
            failed += 1
            continue
        num += 1
        gt = r["tgt"] if truth is None else truth.get(r["idx"])
        if gt is None:
            unknown += 1
            continue
        iou = _charades_iou(parsed[1], parsed[0], gt)
        miou += iou
        for t in hits:
            hits[t] += iou >= t
    out = {"Total": len(scored), "Failed": failed, "num": num}
    out.update({f"R1@{t}": hits[t] * 100 / num if num else 0.0 for t in hits})
    out["mIoU"] = miou / num if num else 0.0
    if truth is not None:
        out.update(missing=len(truth.keys() - {r["idx"] for r in scored}), unknown=unknown,
                   repeated=len(charades) - len(scored))
    return out


# ---------------------------------------------------------------------------------------------
# YouCook2 (docs/scoring-rules.md#youcook2)

YC_THRESHOLDS = (0.3, 0.5, 0.7, 0.9)
# the release's, word for word (its spellings too), for every video
YC_PROMPT = ("You are given a video about 'making fattoush'. Watch the video carefully and densly describe all the "
             "cooking steps. For each step, you need to determine the start and ends times and provide a concise "
             "description. The format of your response should be: '<start time> - <end time>, <description>'.")
YC_DIGITS = 1  # every value is reported x 100, rounded to 1 place
MISSING_SPLIT = -100.0  # SODA_c_1: the release fills the other split's key with -1 (x 100)


def _meteor_pairs(scorers, gts, res):
    """METEOR aggregate and per-pair scores, keys sent in string order as the release's wrapper does."""
    keys = sorted(gts)
    agg, per = scorers.meteor.compute_score({k: gts[k] for k in keys}, {k: res[k] for k in keys})
    return float(np.nan_to_num(agg)), [float(np.nan_to_num(x)) for x in per]


def chased_dp(scores) -> float:
    """Order-preserving assignment (SODA): the best total of scores[i, j] (S, K) over matchings that
    keep the order of both sides. dp[i, j] = max(dp[i-1, j], dp[i, j-1], dp[i-1, j-1] + s[i, j])."""
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


def _check_youcook2(a) -> None:
    """image_id (text), duration (a number), segments ([[s, e], ...]) and pure_cap: text that splits
    at ". " into one caption per segment (the official scorer asserts it)."""
    _require(a, ("image_id", "duration", "segments", "pure_cap"))
    check_text(a["image_id"], "image_id")
    if not is_number(a["duration"]):
        raise BadField("duration", f"is not a finite number: {show(a['duration'])}")
    check_spans(a["segments"], "segments")
    check_text(a["pure_cap"], "pure_cap")
    n = len(a["pure_cap"].split(". "))
    if n != len(a["segments"]):
        raise BadField("pure_cap", f"splits at '. ' into {n} captions for {len(a['segments'])} segments")


def youcook2_records(annotation_path):
    """TimeChat's YouCook2 val file (COCO caption format) -> E.T.Bench-style dvc records (the
    release's prompt, the same for every video, is kept as it is). Video file names are unique."""
    anns = _annotations(annotation_path, _check_youcook2, key=lambda a: Path(a["image_id"]).name)
    return [{"idx": i, "task": "dvc", "source": "youcook2", "video": f"youcook2/compressed_videos/{a['image_id']}",
             "duration": a["duration"], "tgt": a["segments"], "g": a["pure_cap"].split(". "), "q": YC_PROMPT}
            for i, a in enumerate(anns)]


def _predicted(a: str) -> list:
    """[(span, caption), ...] of a response as the release's converter reads it; [] when it has no
    </evi> or nothing parses (official: [], or a crash), or when a caption holds text the tokenizer
    cannot encode (a lone surrogate; official: a crash)."""
    out = dvc_format_d2vlm(a)
    return list(zip(*out)) if out and all(is_text(c) for c in out[1]) else []


def score_youcook2(records, scorers: CaptionScorers | None = None, seed=0, truth=None):
    """Dense captioning on YouCook2 as the D2VLM release scores it: per video, P/R at tIoU > t for
    t in (0.3, 0.5, 0.7, 0.9) (F1 from the video's mean P and R), CIDEr and METEOR over (prediction,
    ground truth) pairs at tIoU >= t, SODA_c; paragraph CIDEr / METEOR over all videos. Every value
    is the mean over the ground-truth videos x 100, rounded to 1 place (n_preds not x 100).
    Predictions are the dvc/youcook2 records keyed by video file name (a repeated one keeps its last
    record, as the converter's dict: "repeated" counts the others). truth: youcook2_records of the
    ground-truth file, as the official scorer reads it: every video of it is scored, one without a
    prediction as zero ("missing"; the release then also misaligns the paragraphs, reproduced), and
    predictions for other videos are ignored ("unknown"). Without truth the records' own tgt / g are
    the ground truth. "Total": videos averaged over; "Failed": those whose response predicts
    nothing (see _predicted). scorers: started here if not given (SentSim is not used, so its
    Embedder never loads); seed: the random captions of unmatched predictions. Raises ValueError
    when no record is dvc/youcook2."""
    dvc = [r for r in records if r["task"] == "dvc" and r["source"] == "youcook2"]
    if not dvc:
        raise ValueError(f"no dvc/youcook2 record among the {len(records)} predictions")
    predicted = {Path(r["video"]).name: _predicted(r["a"]) for r in dvc}
    videos = {}  # {name: (gt spans, gt captions, predictions)}, in ground-truth order
    for r in truth if truth is not None else dvc:
        v = Path(r["video"]).name
        videos[v] = ([[min(s), max(s)] for s in r["tgt"]], [c + "." for c in r["g"]], predicted.get(v, []))
    present = [v for v in videos if v in predicted]
    scorers = scorers or CaptionScorers(Embedder())
    rng = random.Random(seed)  # official: unseeded random strings for unmatched predictions
    per = {k: [] for k in ("CIDER", "METEOR", *[f"{m}@{t}" for t in YC_THRESHOLDS for m in ("Precision", "Recall")],
                           "Precision_Mean", "Recall_Mean", "F1_Score", "SODA_c_2", "n_preds")}
    caption_scores = {v: {"CIDER": [], "METEOR": []} for v in videos}
    for t in YC_THRESHOLDS:
        gts, res, by_video = pair_captions(videos, t, rng)
        tg, tr = (scorers.tokenize(gts), scorers.tokenize(res)) if gts else ({}, {})
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
        iou = np.array([[dense_iou(gs, p) for p, _ in preds] for gs in spans]).reshape(S, K)
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
    out = _paragraphs(scorers, videos, present)
    for k, vals in per.items():
        m = sum(vals) / len(vals) if vals else 0.0
        out[k] = round(m, YC_DIGITS) if k == "n_preds" else round(m * 100, YC_DIGITS)
    out["SODA_c_1"] = MISSING_SPLIT
    out.update(Total=len(videos), Failed=sum(not videos[v][2] for v in present), repeated=len(dvc) - len(predicted))
    if truth is not None:
        out.update(missing=len(videos) - len(present), unknown=len(predicted.keys() - videos.keys()))
    return out


def _soda(scorers, caps, preds, iou):
    """SODA_c of one video from its tokenized ground-truth and predicted captions: METEOR of every
    (ground truth, prediction) pair, the release's argument order (the ground truth as hypothesis)
    and its string-sorted columns, times tIoU (S, K), then chased_dp."""
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


def _paragraphs(scorers, videos, present):
    """Para_CIDER, Para_METEOR: the predicted captions of each video in `present` joined by '. '
    against a ground truth joined by ' ', letters only, corpus-level. The release zips the present
    videos' paragraphs with all ground-truth videos' in order: after a missing video every pair has
    the wrong ground truth, and the last ground truths go unused (its bug, reproduced). No pair: 0."""
    gt_paras = [_parse_sent(" ".join(caps)) for _, caps, _ in videos.values()]
    pred_paras = [_parse_sent(". ".join(c for _, c in videos[v][2])) for v in present]
    pairs = list(zip(gt_paras, pred_paras))
    if not pairs:
        return {"Para_CIDER": 0.0, "Para_METEOR": 0.0}
    gts = {str(k): [g] for k, (g, _) in enumerate(pairs)}
    res = {str(k): [r] for k, (_, r) in enumerate(pairs)}
    cider = float(np.nan_to_num(scorers.cider.compute_score(gts, res)[0]))
    meteor = float(np.nan_to_num(scorers.meteor.compute_score(gts, res)[0]))
    return {"Para_CIDER": round(cider * 100, YC_DIGITS), "Para_METEOR": round(meteor * 100, YC_DIGITS)}


# ---------------------------------------------------------------------------------------------
# Scoring against TimeChat's ground-truth file

def score_timechat(benchmark: str, records, truth_path):
    """("charades" | "youcook2") records scored against the ground truth of TimeChat's file at
    truth_path, as the official scorers read it -> (metrics, one line saying how many ground-truth
    videos / queries have no prediction and what that does). ValueError / FileNotFoundError with
    one line for a bad file or no record of the benchmark."""
    if benchmark == "charades":
        m = score_charades(records, charades_truth(truth_path))
        return m, (f"charades: {m['missing']} ground-truth queries of {truth_path} have no prediction (left out, as "
                   f"the release leaves them); {m['unknown']} predictions have an idx it does not hold (in the "
                   f"denominator with no hit, as the release counts them); {m['repeated']} repeated idx (the last "
                   "counts)")
    m = score_youcook2(records, truth=youcook2_records(truth_path))
    return m, (f"youcook2: {m['missing']} of the {m['Total']} ground-truth videos of {truth_path} have no "
               f"prediction (scored as zero, as the release scores them); {m['unknown']} predicted videos are not "
               f"in it (ignored); {m['repeated']} repeated videos (the last counts)")
