"""E.T.Bench scoring: the official compute_metrics.py rule by rule (docs/scoring-rules.md#etbench).

The task scorers of the etchat protocol (strict differs for multiple choice only), the dispatcher
`score_etbench` over all three protocols (d2vlm: d2vlm.py; dense captioning: captions.py),
the per-task summary with the merged rows of the official table, and the predictions reader.

    score_tvg, score_tal, score_evs, score_vhd, score_gvq    samples -> {metric: value}
    score_mcq(samples, embed, strict)                       samples -> {"Total", "Failed", "Acc"}
    score_etbench(records, protocol, embed, scorers)        -> {task: {source: {metric: value}}}
    summary(metrics) -> (per-task means, merged rows); table(metrics) -> str

    load_predictions(path) -> records      one ValueError line for a bad file, record or field

samples: one (task, source) group of records, each an E.T.Bench dict with the response in "a".
Where the official script crashes on a response ("10..." as a number, a NaN IoU in TAL, a lone
surrogate for MiniLM, a sixth option) or turns a mean NaN (a NaN IoU), the record is Failed.
"""
from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

from data import BENCH_TASKS, CAPTION_TASKS, COMPLEX_TASKS, GROUNDING_TASKS, MCQ_TASKS, ONE_SPAN_TASKS, OPTION_TASKS
from scoring.captions import CaptionScorers, score_dvc
from scoring.d2vlm import d2vlm_evs, d2vlm_gvq, d2vlm_mcq, d2vlm_tal, d2vlm_tvg, d2vlm_vhd
from scoring.rules import (THRESHOLDS, BadField, Embedder, Unparsable, Unscorable, at_thresholds, best_iou, check_span,
                           check_spans, check_text, closest_option, evs_f1, letter_choice, letter_map, lone_letter,
                           strip_best_option, temporal_iou, tvg_format)
from support.files import is_number, parse_json, read_text, show

# each task's headline metric, by its capability (data.BENCH_TASKS' groups), in the official table's order
HEADLINE = {t: metric for group, metric in ((MCQ_TASKS, "Acc"), (GROUNDING_TASKS + CAPTION_TASKS, "F1"),
                                            (COMPLEX_TASKS, "mRec")) for t in group}
PROTOCOLS = ("etchat", "strict", "d2vlm")
METRICS = "metrics"  # what metrics files' names start with (metrics_<name>.json); prediction_files leaves them out
DIGITS = 5  # every per-source number is rounded to 5 places, and so is every per-task mean
# the d2vlm protocol's match ratios, left unrounded as the release leaves them
UNROUNDED = ("matched_ratio", "correct_ratio_within_matched", "Matched ratio", "correct ratio within matched")
SIM_COLUMNS = {t: f"{t}_sim" for t in CAPTION_TASKS}  # summary's caption similarity (SentSim) of each caption task
# the official table: (row, tasks averaged, rounded to 1 place before printing)
MERGED = (("Acc (ref)", MCQ_TASKS, True), ("F1 (gnd)", GROUNDING_TASKS, True), ("F1 (cap)", CAPTION_TASKS, False),
          ("Sim (cap)", tuple(SIM_COLUMNS.values()), False), ("Rec (com)", COMPLEX_TASKS, False))
# its per-task row: each task, a caption task followed by its similarity
COLUMNS = tuple(c for t in BENCH_TASKS for c in ((t, SIM_COLUMNS[t]) if t in SIM_COLUMNS else (t,)))


def _safe_spans(a):
    try:
        return tvg_format(a)
    except Unparsable:
        return None


def first_iou(a, gt):
    """The official IoU of a response's first span against the gt spans (N, 2) (the best over them),
    or None when the sample is Failed: no span, or one the official script crashes on or turns NaN."""
    try:
        spans = tvg_format(a)
        return None if spans is None else best_iou(gt, [spans[0]])
    except Unscorable:
        return None


# ---------------------------------------------------------------------------------------------
# Grounding tasks

def _first_span(samples, gt_is_list):
    """IoU of each sample's first predicted span (against its one gt span, or the best of its gt
    spans): (failed, sum of IoU, hits per threshold)."""
    failed, sum_iou, hits = 0, 0.0, [0] * len(THRESHOLDS)
    for s in samples:
        iou = first_iou(s["a"], s["tgt"] if gt_is_list else [s["tgt"]])
        if iou is None:
            failed += 1
            continue
        sum_iou += iou
        for i, t in enumerate(THRESHOLDS):
            hits[i] += iou >= t
    return failed, sum_iou, hits


def score_tvg(samples, tem=False):
    """TVG, EPM (docs/scoring-rules.md#tvg-and-epm): IoU of the first predicted span (tgt: [s, e]); "F1" is R@1 averaged over
    the thresholds. tem=True: TEM (docs/scoring-rules.md#tem), the first span's best IoU over the gt spans (tgt:
    [[s, e], ...]), keys R@t, mRec."""
    total = len(samples)
    failed, sum_iou, hits = _first_span(samples, gt_is_list=tem)
    rate, mean_key = ("R", "mRec") if tem else ("F1", "F1")
    rates, mean = at_thresholds(rate, hits, total)
    return {"Total": total, "Failed": failed, "mIoU": sum_iou / total, **rates, mean_key: mean}


def _tal_f1(iou) -> list[float]:
    """One TAL sample's F1 at each threshold from its G x P IoU matrix (0 where no IoU reaches t).
    A NaN in the matrix makes its max NaN, so no threshold is skipped, and hides the matches of its
    row and column; where that leaves none, the official divides 0 by 0: raises Unscorable."""
    out = []
    for t in THRESHOLDS:
        if iou.max() < t:
            out.append(0.0)
            continue
        rec = (iou.max(1).values >= t).float().mean().item()
        prc = (iou.max(0).values >= t).float().mean().item()
        if prc + rec == 0:
            raise Unscorable("TAL: no match at a threshold a NaN IoU let through")
        out.append(2 * prc * rec / (prc + rec))
    return out


def score_tal(samples):
    """TAL (docs/scoring-rules.md#tal): per-sample F1 at each threshold from the G x P IoU matrix; failed = 0."""
    total, failed, f1 = len(samples), 0, [0.0] * len(THRESHOLDS)
    for s in samples:
        try:
            pred = tvg_format(s["a"])
            sample_f1 = None if pred is None else _tal_f1(temporal_iou(s["tgt"], pred))
        except Unscorable:
            sample_f1 = None
        if sample_f1 is None:
            failed += 1
            continue
        f1 = [acc + x for acc, x in zip(f1, sample_f1)]
    rates, mean = at_thresholds("F1", f1, total)
    return {"Total": total, "Failed": failed, **rates, "F1": mean}


def score_evs(samples):
    """EVS (docs/scoring-rules.md#evs): F1 on one-second bins; averaged over the parsed samples only."""
    total, failed, f1s = len(samples), 0, []
    for s in samples:
        pred = _safe_spans(s["a"])
        if pred is None:
            failed += 1
            continue
        try:
            f1s.append(evs_f1(s["tgt"], pred))
        except (OverflowError, ValueError):  # an inf / nan time
            failed += 1
    return {"Total": total, "Failed": failed, "F1": sum(f1s) / len(f1s) if f1s else 0}


def score_vhd(samples):
    """VHD (docs/scoring-rules.md#vhd): the first number of the response inside any ground-truth span of any
    annotator (tgt: [[s, e], ...] or one such list per annotator)."""
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

def _letter_hit(letter, letters, gt, strict):
    """The hit (0 or 1) when a parsed letter settles the sample, else None (the next rule decides):
    etchat settles on a correct letter only, strict on any letter of the map."""
    if letter in letters and (strict or letters.index(letter) == gt):
        return int(letters.index(letter) == gt)
    return None


def score_mcq(samples, embed, strict=False):
    """RAR, ECA, RVQ (docs/scoring-rules.md#rar-eca-rvq), options in "o", the answer's index in "p". etchat: a correct "(x)"
    or leading letter is a hit; anything else falls through to the option most similar to the
    response (embed: a scoring.Embedder). strict: the parsed letter decides."""
    total, failed, hits = len(samples), 0, 0
    letters = letter_map(samples)
    for s in samples:
        a, gt = s["a"], s["p"]
        if letters is None:  # official: NotImplementedError for the whole group
            failed += 1
            continue
        ever = False
        m = re.search(r"\(([A-Za-z])\)", a)
        if m:
            ever = True
            hit = _letter_hit(m.group(1).lower(), letters, gt, strict)
            if hit is not None:
                hits += hit
                continue
        pred = strip_best_option(a.lower())
        if not pred:
            failed += 1
            continue
        letter = lone_letter(pred)
        if letter is not None:
            ever = True
            hit = _letter_hit(letter, letters, gt, strict)
            if hit is not None:
                hits += hit
                continue
        try:
            choice = closest_option(pred, s["o"], embed)
        except Unscorable:  # official: a crash
            failed += 1
            continue
        failed += not ever
        hits += choice == gt
    return {"Total": total, "Failed": failed, "Acc": hits / total}


def score_gvq(samples, embed):
    """GVQ (docs/scoring-rules.md#gvq): the answer must be right (letter, else similarity with embed) and its first
    span must reach the IoU threshold (tgt: [s, e])."""
    total, acc_cnt, rec_cnt, correct_n, sum_iou, hits = len(samples), 0, 0, 0, 0.0, [0] * len(THRESHOLDS)
    for s in samples:
        pred = strip_best_option(s["a"])
        if not pred:
            acc_cnt += 1
            continue
        choice = letter_choice(pred, len(s["o"]))
        if choice is None:
            try:
                choice = closest_option(pred, s["o"], embed)
            except Unscorable:  # official: a crash
                acc_cnt += 1
                continue
        if choice != s["p"]:
            continue
        correct_n += 1
        iou = first_iou(s["a"], [s["tgt"]])
        if iou is None:
            rec_cnt += 1
            continue
        sum_iou += iou
        for i, t in enumerate(THRESHOLDS):
            hits[i] += iou >= t
    rates, mean = at_thresholds("R", hits, total)
    return {"Total": total, "Failed": rec_cnt + acc_cnt, "mIoU": sum_iou / total, **rates, "mRec": mean,
            "Acc": correct_n / total}


# ---------------------------------------------------------------------------------------------
# The benchmark

def score_etbench(records, protocol=PROTOCOLS[0], embed=None, scorers=None):
    """Records with the model's response in "a", grouped by (task, source) in order of first
    appearance -> {task: {source: {"Total", "Failed", metrics...}}}, every number rounded to 5 places.
    embed: the scoring.Embedder for multiple choice (default: a new one; scorers' when given);
    scorers: a captions.CaptionScorers, started only when a caption task comes up if not given."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}")
    d2vlm = protocol == "d2vlm"
    if embed is None:
        embed = scorers.embed if scorers is not None else Embedder()
    groups = defaultdict(list)
    for r in records:
        groups[(r["task"], r["source"])].append(r)
    out = {}
    for (task, source), samples in groups.items():
        if task in ("tvg", "epm", "tem"):
            res = d2vlm_tvg(samples, tem=task == "tem") if d2vlm else score_tvg(samples, tem=task == "tem")
        elif task == "tal":
            res = d2vlm_tal(samples) if d2vlm else score_tal(samples)
        elif task == "evs":
            res = d2vlm_evs(samples) if d2vlm else score_evs(samples)
        elif task == "vhd":
            res = d2vlm_vhd(samples) if d2vlm else score_vhd(samples)
        elif task in MCQ_TASKS:
            res = d2vlm_mcq(samples, embed) if d2vlm else score_mcq(samples, embed, strict=protocol == "strict")
        elif task == "gvq":
            res = d2vlm_gvq(samples, embed) if d2vlm else score_gvq(samples, embed)
        elif task in CAPTION_TASKS:
            scorers = scorers or CaptionScorers(embed)
            res = score_dvc(samples, scorers, d2vlm=d2vlm)
        else:
            raise ValueError(f"unknown task {task!r} (source {source})")
        out.setdefault(task, {})[source] = {k: v if isinstance(v, int) or k in UNROUNDED else round(float(v), DIGITS)
                                            for k, v in res.items()}
    return out


def summary(metrics):
    """Per-task means over sources (rounded to 5 places, as fractions) and the merged rows of the
    official table (in percent, computed from the rounded task values exactly as the official
    script does: Acc (ref) and F1 (gnd) rounded to 1 place, the other three not rounded; None
    where a task of the row is missing)."""
    def mean(vals):
        return round(sum(vals) / len(vals), DIGITS)
    task = {t: mean([m[HEADLINE[t]] for m in srcs.values()]) for t, srcs in metrics.items()}
    for t, column in SIM_COLUMNS.items():
        if t in metrics:
            task[column] = mean([m["SentSim"] for m in metrics[t].values()])
    merged = {}
    for name, keys, rounded in MERGED:
        have = [task[k] for k in keys if k in task]
        if have:
            value = sum(have) * 100 / len(keys) if len(have) == len(keys) else None
            merged[name] = round(value, 1) if rounded and value is not None else value
    return task, merged


def table(metrics) -> str:
    """The per-task row in percent (and, under d2vlm, the evidence row), then the merged rows."""
    task, merged = summary(metrics)
    cols = [c for c in COLUMNS if c in task]
    lines = [" | ".join(f"{c.upper():>7}" for c in cols), " | ".join(f"{round(100 * task[c], 1):>7}" for c in cols)]
    evi = {t: round(sum(m[HEADLINE[t] + "_evi"] for m in srcs.values()) / len(srcs), DIGITS)
           for t, srcs in metrics.items() if all(HEADLINE[t] + "_evi" in m for m in srcs.values())}
    if evi:  # the d2vlm protocol: the same headline computed on the evidence spans
        lines.append(" | ".join(f"{round(100 * evi[c], 1) if c in evi else '':>7}" for c in cols) + "   (evidence)")
    lines.append("merged: " + ", ".join(f"{k} {'-' if v is None else round(v, 1)}" for k, v in merged.items())
                 + ("  (- : needs every task of the row)" if None in merged.values() else ""))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The predictions reader

JSON_TYPES = {dict: "an object", list: "a list", str: "a string", int: "a number", float: "a number",
              bool: "a boolean", type(None): "null"}


def _check_shared(r) -> None:
    """Raise BadField unless the record (a dict) has "task" (an E.T.Bench task), "source" and "a"
    strings."""
    for field in ("task", "source", "a"):
        if field not in r:
            raise BadField(field, "missing")
        if not isinstance(r[field], str):
            raise BadField(field, f"is not a string: {show(r[field])}")
    if r["task"] not in BENCH_TASKS:
        raise BadField("task", f"is not an E.T.Bench task ({', '.join(BENCH_TASKS)}): {show(r['task'])}")


def _check_vhd(tgt) -> None:
    """VHD's tgt: [[s, e], ...], or one such list per annotator (told apart by tgt[0][0], as officially)."""
    per_annotator = isinstance(tgt, list) and tgt and isinstance(tgt[0], list) and tgt[0] \
        and isinstance(tgt[0][0], list)
    for spans in tgt if per_annotator else [tgt]:
        check_spans(spans, "tgt")


def _check_options(o, p) -> None:
    if not isinstance(o, list) or not o:
        raise BadField("o", f"is not a non-empty list of options: {show(o)}")
    for opt in o:
        if isinstance(opt, (list, tuple)):  # an option that is a span, written "s - e"
            if len(opt) != 2 or not all(is_number(x) for x in opt):
                raise BadField("o", f"has an option that is neither text nor [start, end]: {show(opt)}")
        else:
            check_text(opt, "o")
    if not isinstance(p, int) or isinstance(p, bool) or not 0 <= p < len(o):
        raise BadField("p", f"is not the index of one of the {len(o)} options: {show(p)}")


def _check_task_fields(r, require=()) -> None:
    """Raise BadField unless r (past _check_shared) has what its task's scorer reads: "tgt" (tvg,
    epm, gvq: [s, e]; vhd: see _check_vhd; rar, eca, rvq: none; the others: [[s, e], ...]; finite,
    s <= e), "o" and "p" for multiple choice, "g" (one caption per span) and "video" (the key of a
    parsed sample) for dvc / slc, and each field of `require` (only "idx": an int)."""
    task = r["task"]
    needed = (*(() if task in MCQ_TASKS else ("tgt",)), *(("o", "p") if task in OPTION_TASKS else ()),
              *(("g", "video") if task in CAPTION_TASKS else ()), *require)
    for field in needed:
        if field not in r:
            raise BadField(field, "missing")
    if task in ONE_SPAN_TASKS:
        check_span(r["tgt"], "tgt")
    elif task == "vhd":
        _check_vhd(r["tgt"])
    elif task not in MCQ_TASKS:
        check_spans(r["tgt"], "tgt")
    if task in OPTION_TASKS:
        _check_options(r["o"], r["p"])
    if task in CAPTION_TASKS:
        if not isinstance(r["g"], list) or len(r["g"]) != len(r["tgt"]):
            raise BadField("g", f"is not a list of one caption per tgt span ({len(r['tgt'])}): {show(r['g'])}")
        for caption in r["g"]:
            check_text(caption, "g")
        check_text(r["video"], "video")
    if "idx" in require and (not isinstance(r["idx"], int) or isinstance(r["idx"], bool)):
        raise BadField("idx", f"is not an integer: {show(r['idx'])}")


def _where(r) -> str:
    """ " (task 'tvg', source 's', video 'v.mp4', idx 3)": whichever of these the record has."""
    parts = [f"{k} {show(r[k])}" for k in ("task", "source", "video", "idx") if k in r]
    return f" ({', '.join(parts)})" if parts else ""


def _read_json(f: Path) -> list:
    """The records of one .json (a list) or .jsonl (one a line) file; ValueError naming the file."""
    text = read_text(f, "prediction file")
    if not text.strip():
        raise ValueError(f"{f}: holds no records (empty file)")
    if f.suffix == ".jsonl":  # split on "\n" only: a JSON string may hold a raw U+2028
        return [parse_json(line, f, n) for n, line in enumerate(text.split("\n"), 1) if line.strip()]
    docs = parse_json(text, f)
    if not isinstance(docs, list):
        raise ValueError(f"{f}: expected a JSON list of records, got {JSON_TYPES[type(docs)]}")
    if not docs:
        raise ValueError(f"{f}: holds no records")
    return docs


def prediction_files(path) -> tuple:
    """(the predictions files `path` names, the names left out): the file itself, or a folder's
    *.json / *.jsonl files by name, leaving out metrics files (named metrics*) and hidden ones
    (a leading dot: the outputs registry) and files of other extensions. FileNotFoundError when
    there is none."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: prediction file not found")
    if not path.is_dir():
        return [path], []
    files, skipped = [], []
    for p in sorted(path.iterdir()):
        ok = p.is_file() and p.suffix in (".json", ".jsonl") and not p.name.startswith((METRICS, "."))
        (files if ok else skipped).append(p if ok else p.name)
    if not files:
        raise FileNotFoundError(f"{path}: no *.json or *.jsonl prediction files"
                                + (f" ({', '.join(skipped)} left out)" if skipped else ""))
    return files, skipped


def load_predictions(path, require=()):
    """A JSON list, or a folder of them (prediction_files), of E.T.Bench records with the response in
    "a" -> the records (list of dicts). Every record is checked for what its task's scorer reads
    (_check_shared, _check_task_fields; `require`: extra fields, only "idx"). Raises
    FileNotFoundError, or ValueError with one line naming the file, the record (its index in the
    file, and its task, source, video, idx) and the field: a file that is not UTF-8 JSON, not a
    list or empty; a record with a field missing, of the wrong type or shape, a ground truth
    that is empty, not finite or reversed. A file's shared fields are checked before any task
    field, so a file of annotations without "a" is named as such first."""
    files, _ = prediction_files(path)
    records = []
    for f in files:
        recs = _read_json(f)
        for i, r in enumerate(recs):
            if not isinstance(r, dict):
                raise ValueError(f"{f}: record {i}: not a JSON object but {JSON_TYPES[type(r)]}: {show(r)}")
        for check in (_check_shared, lambda r: _check_task_fields(r, require)):
            for i, r in enumerate(recs):
                try:
                    check(r)
                except BadField as e:
                    raise ValueError(f"{f}: record {i}: {e}{_where(r)}") from None
        records += recs
    return records
