"""Charades-STA and YouCook2 as the D2VLM release scores them in TimeChat's format (scoring-spec.md §3, §4).

    charades_records(path) -> tvg records;  score_charades(records) -> {"Total", "Failed", "num", R1@t, "mIoU"}
    youcook2_records(path) -> dvc records;  score_youcook2(records, scorers, seed) -> {metric: value}
    chased_dp(scores (S, K)) -> the best order-preserving matching's total (SODA)

records: E.T.Bench-style dicts with the response in "a"; only tvg/charades_sta, resp. dvc/youcook2
records count.
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np

from captions import CaptionScorers, dvc_format_d2vlm, pair_captions
from evidence import EVI_END
from scoring import Embedder, Unparsable, dense_iou, tvg_format, written_pairs

# ---------------------------------------------------------------------------------------------
# Charades-STA (spec §3)

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


def charades_records(annotation_path):
    """TimeChat's Charades-STA test file (COCO caption format) -> E.T.Bench-style tvg records, as
    the D2VLM release builds them (idx = the annotation's position; duration None)."""
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
    hits, miou, num, failed, total = dict.fromkeys(CHARADES_THRESHOLDS, 0), 0.0, 0, 0, 0
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
# YouCook2 (spec §4)

YC_THRESHOLDS = (0.3, 0.5, 0.7, 0.9)
YC_PROMPT = ("You are given a video about 'making fattoush'. Watch the video carefully and densely describe all the "
             "cooking steps. For each step, provide the start and end time and a brief description. The format of your "
             "response should be: '<start time> - <end time>, <description>'.")  # the release's, for every video
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


def youcook2_records(annotation_path):
    """TimeChat's YouCook2 val file (COCO caption format) -> E.T.Bench-style dvc records (the
    release's prompt, the same for every video, is kept as it is)."""
    anns = json.loads(Path(annotation_path).read_text(encoding="utf-8"))["annotations"]
    return [{"idx": i, "task": "dvc", "source": "youcook2", "video": f"youcook2/compressed_videos/{a['image_id']}",
             "duration": a["duration"], "tgt": a["segments"], "g": a["pure_cap"].split(". "), "q": YC_PROMPT}
            for i, a in enumerate(anns)]


def score_youcook2(records, scorers: CaptionScorers | None = None, seed=0):
    """Dense captioning on YouCook2 as the D2VLM release scores it: per video, P/R at tIoU > t for
    t in (0.3, 0.5, 0.7, 0.9) (F1 from the video's mean P and R), CIDEr and METEOR over (prediction,
    ground truth) pairs at tIoU >= t, SODA_c; paragraph CIDEr / METEOR over all videos. Every value
    is the mean over the ground-truth videos x 100, rounded to 1 place (n_preds not x 100).
    scorers: started here if not given (SentSim is not used, so its Embedder never loads);
    seed: the random captions of unmatched predictions."""
    scorers = scorers or CaptionScorers(Embedder())
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
    out = _paragraphs(scorers, videos)
    for k, vals in per.items():
        m = sum(vals) / len(vals) if vals else 0.0
        out[k] = round(m, YC_DIGITS) if k == "n_preds" else round(m * 100, YC_DIGITS)
    out["SODA_c_1"] = MISSING_SPLIT
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


def _paragraphs(scorers, videos):
    """Para_CIDER, Para_METEOR: each video's predicted captions joined by '. ' against its ground
    truth joined by ' ', letters only, corpus-level."""
    gts = {v: [_parse_sent(" ".join(caps))] for v, (_, caps, _) in videos.items()}
    res = {v: [_parse_sent(". ".join(c for _, c in preds))] for v, (_, _, preds) in videos.items()}
    cider = float(np.nan_to_num(scorers.cider.compute_score(gts, res)[0]))
    meteor = float(np.nan_to_num(scorers.meteor.compute_score(gts, res)[0]))
    return {"Para_CIDER": round(cider * 100, YC_DIGITS), "Para_METEOR": round(meteor * 100, YC_DIGITS)}
