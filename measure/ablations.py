"""The paper's two ablation tables in miniature: `python bench.py ablate`. Paper: "Ablation Study".

Every row is a switch of config.D2VLMConfig (README "Ablations"), trained by train.py with the
`tiny` recipe plus RECIPE on a separate synthetic set and scored on its 200 test videos:

    A1 coupled response     response_format=coupled          B1 frame-level evidence   evidence_level=frame
    A2 factorized, as text  response_format=factorized_text  B2 no semantic capture    semantic_capture=false
    A3 interleaved <evi>    w_cons=0                         B3 full design            = A4
    A4 + consistency        (the default)
    A5 + FPO                train.py --stage fpo from A4's run

    run_all(rows, seeds, ..., jobs)   trains, predicts and scores each (row, seed) not done yet, `jobs` runs
                                  at a time in as many processes, each on RUN_THREADS threads; returns the results
    tables(results) / show(...)   mean and std over the seeds of each row, beside the paper's numbers
    orderings(results) / show_orderings(...)   each step of a table (A1 -> A2, ...) seed by seed, beside the paper's
    plot(summary, path)           the tables as a PNG (plots.ablation_tables)

Each row is scored on its answer: the text after the first </evi> (stage 2), or the whole response
when it has none (A1), under the etchat protocol (which reads "s - e" in text and needs no </evi>),
so that every row is judged on what it answers, as the d2vlm protocol judges D2VLM.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import torch

import checkpoint
import evaluate
import event_videos
import train
from config import PRESETS, D2VLMConfig, configure
from data import answer_text
from evidence import EVI_END
from measure import plots
from scoring import etbench
from support.files import atomic_path, read_json

ABLATION_DATA = Path("data/synthetic-ablate")  # its own seed: the default test split is left as it is
ABLATION_SPLIT = {"n_train": 200, "n_test": 200, "seed": 1}
ROOT = Path(checkpoint.RUNS) / "ablate"
# on top of `tiny`, for every row: no Q-Former dropout (its masks and the attention path they force
# cost about a fifth of a tiny CPU step: two runs side by side, 60 steps, 49 s -> 40 s; `tiny` has no
# LoRA dropout either)
RECIPE = ("qformer_dropout=0",)
# threads per run: a tiny model gains nothing from a second thread (60 SFT steps: 33 s on one, 35 s on
# two), two one-thread runs side by side take 49 s; fixed, so that a result does not depend on `jobs`
RUN_THREADS = 1
METRICS = ("F1 (gnd)", "F1 (cap)", "Sim (cap)")  # the paper's columns: grounding avg F1, dense-caption F1, Sim
# row: (what it is, --set overrides, the stage scored, the run it trains in, the paper's METRICS)
ROWS = {
    "A1": ("baseline (coupled)", ["response_format=coupled"], "sft", "A1", (21.2, 14.3, 11.3)),
    "A2": ("+ factorized objective", ["response_format=factorized_text"], "sft", "A2", (28.9, 23.1, 16.0)),
    "A3": ("+ interleaved text-<evi> generation", ["w_cons=0"], "sft", "A3", (35.6, 34.3, 19.8)),
    "A4": ("+ consistency constraint", [], "sft", "A4", (39.5, 35.0, 21.2)),
    "A5": ("+ FPO", [], "fpo", "A4", (42.3, 37.5, 21.8)),
    "B1": ("no event-level modeling (frame-level)", ["evidence_level=frame"], "sft", "B1", (26.1, 33.4, 16.2)),
    "B2": ("no visual semantic capture", ["semantic_capture=false"], "sft", "B2", (37.1, 27.5, 17.7)),
    "B3": ("full design (= A4)", [], "sft", "A4", (39.5, 35.0, 21.2)),
}
TABLES = {"A: generation objective": ("A1", "A2", "A3", "A4", "A5"),
          "B: evidence token": ("B1", "B2", "B3")}
PREDICTIONS = "predictions_ablate.json"  # a run's answers on the ablation split, in checkpoint.results_dir
# the paper's claims: each A-row adds one thing to the one before; each B-row takes one away from B3
STEPS = (("A1", "A2"), ("A2", "A3"), ("A3", "A4"), ("A4", "A5"), ("B1", "B3"), ("B2", "B3"))


def kept_as(row: str) -> str:
    """The row whose result stands for `row` (B3 is A4)."""
    return "A4" if row == "B3" else row


def answer_of(response: str) -> str:
    """What a row is scored on: the text after the first </evi>, or all of it when there is none."""
    return answer_text(response) if EVI_END in response else response


def result_path(root: Path, row: str, seed: int) -> Path:
    """Where the result of one (row, seed) is kept."""
    return root / "results" / f"{row}-s{seed}.json"


def _as_json(cfg) -> dict:
    """A config as it reads back from JSON (tuples as lists)."""
    return json.loads(cfg.to_json())


def _config(extra, overrides) -> dict:
    """The config a row's SFT run trains with now: train.py's preset (tiny unless `extra` names one),
    the --set of `extra`, then `overrides` (RECIPE and the row's switch)."""
    args = train.get_args(["--stage", "sft", *extra, *(["--set", *overrides] if overrides else [])])
    return _as_json(configure(PRESETS[args.preset or "tiny"], args.set))


def _trained(stage_dir: Path) -> bool:
    """A run ended (its log's last line is the summary)."""
    log = stage_dir / "log.jsonl"
    lines = log.read_text(encoding="utf-8").splitlines() if log.is_file() else []
    return bool(lines) and json.loads(lines[-1]).get("summary", False)


def _train(run: Path, stage: str, overrides, seed: int, data_root: Path, extra, start: str) -> float:
    """Train one stage of one run unless it has ended; go on from its newest checkpoint if it was cut
    short. SFT starts from `start` (a checkpoint directory, or "none": random weights). Returns the
    seconds spent."""
    stage_dir = run / stage
    if _trained(stage_dir):
        return 0.0
    t = time.perf_counter()
    args = ["--stage", stage, "--out", str(run.parent), "--name", run.name, "--seed", str(seed),
            "--data", str(data_root / "train.json"), "--videos", str(data_root / "videos"), *extra]
    if stage == "sft" and overrides:
        args += ["--set", *overrides]
    if checkpoint.checkpoints(stage_dir):
        args += ["--resume"]  # the run goes on from where it started
    elif stage == "sft":
        args += ["--init", start]
    train.main(args)
    plots.curves(run, run / "curves.png")
    return time.perf_counter() - t


def run_one(row: str, seed: int, root: Path = ROOT, data_root: Path = ABLATION_DATA, extra=(), batch_size: int = 8,
            max_new_tokens: int | None = None, start: str = train.NO_INIT):
    """Train (if needed), predict and score one row with one seed, its SFT from `start` (a checkpoint
    directory, or "none": random weights); the result is kept in root/results/<row>-s<seed>.json and
    read back from there on the next call (if it was made from the same start, with the same train.py
    arguments `extra` and the same config: the preset with RECIPE and the row's switch on top, so a
    changed preset or RECIPE is not mixed with results made before)."""
    out = result_path(root, row, seed)
    _, switch, stage, name, _ = ROWS[row]
    overrides = [*RECIPE, *switch]
    if out.is_file():
        result = read_json(out)
        if result["start"] != start:
            raise SystemExit(f"{out}: made from the starting point {result['start']}, not {start}: remove {root} "
                             "(or move it) first")
        if result["args"] != list(extra):
            raise SystemExit(f"{out}: made with the train.py arguments [{' '.join(result['args'])}], not "
                             f"[{' '.join(extra)}]: remove {root} (or move it) first")
        # a field added since the result was made reads as its default, as a saved config does (from_dict)
        made = _as_json(D2VLMConfig.from_dict(result.get("config", {}), out))
        differ = [f"{k}={made.get(k)!r} (now {v!r})" for k, v in _config(extra, overrides).items() if made.get(k) != v]
        if differ:
            raise SystemExit(f"{out}: made with {', '.join(differ)}: remove {root} (or move it) first")
        return result
    run = root / f"{name}-s{seed}"
    took = _train(run, "sft", overrides, seed, data_root, extra, start)
    if stage == "fpo":
        took += _train(run, "fpo", overrides, seed, data_root, extra, start)
    ckpt = checkpoint.checkpoints(run / stage)[-1]
    t = time.perf_counter()
    m = checkpoint.from_checkpoint(ckpt).eval()
    test = read_json(data_root / "test.json")
    preds = evaluate.predict(m, test, data_root / "videos", batch_size=batch_size, max_new_tokens=max_new_tokens)
    scored = [{**p, "a": answer_of(p["a"]), "response": p["a"]} for p in preds]
    pred_path = checkpoint.results_dir(ckpt) / PREDICTIONS
    pred_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(pred_path) as tmp:
        tmp.write_text(json.dumps(scored, indent=1), encoding="utf-8")
    task, merged = etbench.summary(etbench.score_etbench(scored, "etchat"))
    result = {"row": row, "seed": seed, "checkpoint": str(ckpt), **{k: merged[k] for k in METRICS},
              "tasks": {k: round(100 * v, 2) for k, v in task.items()},
              "train_s": round(took, 1), "eval_s": round(time.perf_counter() - t, 1), "set": overrides, "start": start, "args": list(extra),
              "config": _as_json(checkpoint.read_config(ckpt)), "tvg_picks": tvg_picks(scored, test)}
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(result, indent=1), encoding="utf-8")
    print(f"ablate {row} seed {seed}: " + ", ".join(f"{k} {result[k]:.1f}" for k in METRICS), file=sys.stderr)
    return result


def _run_group(rows, seed, root, data_root, extra, batch_size, max_new_tokens, start) -> None:
    """run_one for the rows of one training run (A4 before A5), in a worker process on RUN_THREADS threads."""
    torch.set_num_threads(RUN_THREADS)
    for row in sorted(rows, key=lambda r: ROWS[r][2] == "fpo"):
        run_one(row, seed, root, data_root, extra, batch_size, max_new_tokens, start)


def miniature_start(kept_only: bool = False) -> str:
    """The newest intact checkpoint of the miniature's starting point (<runs>/start/pretrain, where the
    quickstart's SFT starts), built first when there is none, unless only kept results are read."""
    if train.intact_start(checkpoint.RUNS)[0] is None and not kept_only:
        train.main(["--stage", "pretrain"])
    found = train.intact_start(checkpoint.RUNS)[0]
    if found is None:
        raise SystemExit(f"{train.start_dir(checkpoint.RUNS)}: no intact starting point, so no kept result made from "
                         "it (run without --kept)")
    return str(found)


def run_all(rows, seeds, root: Path = ROOT, data_root: Path | None = None, extra=(), batch_size: int = 8,
            max_new_tokens: int | None = None, kept_only: bool = False, jobs: int | None = None,
            start: str | None = None):
    """Every (row, seed) of `rows` x range(seeds): what is not kept yet is run by `jobs` worker
    processes (default: one per core), a training run at a time each (A5 after A4 in A4's run; B3 is
    A4's result), the longest (those with FPO) first; the first failure starts nothing more and is
    raised. data_root None: the ablation set, generated on first use. kept_only: only the results
    already kept (train and predict nothing). Every SFT run starts from `start` (a checkpoint
    directory, or "none": random weights); None: the miniature's starting point, as the quickstart's.
    Returns the results, seed by seed in the order of `rows`."""
    root = Path(root)
    if start not in (None, train.NO_INIT):  # checked before the ablation set is made
        start = str(checkpoint.resolve(start, "--init"))
    start = start or miniature_start(kept_only)
    if data_root is None:
        data_root = ABLATION_DATA if kept_only else event_videos.ensure_synthetic(ABLATION_DATA, **ABLATION_SPLIT)[0].parent
    data_root = Path(data_root)
    rows = list(dict.fromkeys(kept_as(r) for r in rows))
    pairs = [(row, seed) for seed in range(seeds) for row in rows]
    # read first: a kept result made otherwise stops the call before anything runs
    done = {(row, seed): run_one(row, seed, root, data_root, extra, start=start) for row, seed in pairs
            if result_path(root, row, seed).is_file()}
    missing = [pair for pair in pairs if pair not in done]
    if missing and not kept_only:
        groups = {}
        for row, seed in missing:
            groups.setdefault((ROWS[row][3], seed), []).append(row)
        todo = sorted(groups.items(), key=lambda g: not any(ROWS[r][2] == "fpo" for r in g[1]))
        with ProcessPoolExecutor(jobs or os.cpu_count(), mp_context=multiprocessing.get_context("spawn")) as pool:
            runs = [pool.submit(_run_group, group, seed, root, data_root, tuple(extra), batch_size, max_new_tokens, start)
                    for (_, seed), group in todo]
            try:
                for f in as_completed(runs):
                    f.result()
            except BaseException:  # the first failure: start nothing more (what runs ends, its result kept)
                pool.shutdown(cancel_futures=True)
                raise
        done.update({(row, seed): run_one(row, seed, root, data_root, extra, start=start) for row, seed in missing})
    return [done[pair] for pair in pairs if pair in done]


def tvg_picks(predictions, records) -> dict:
    """Whether each TVG answer grounds the event its query names, on a synthetic split (where every
    video has a dvc record listing all its events). An answer picks the named event when its first
    span, as the scorer reads it, overlaps that event more than any other event of the video.
    predictions: scored records (task, video, tgt, a); records: the split's test records.
    Returns {"single": [picked, asked] on one-event videos, "multi": [picked, asked] on videos with
    several, "chance": the picks a uniform choice among each multi-event video's events would get},
    or None when a TVG question's video has no dvc record (a split that does not list the events)."""
    events = {r["video"]: r["tgt"] for r in records if r["task"] == "dvc"}
    if any(p["task"] == "tvg" and p["video"] not in events for p in predictions):
        return None
    out = {"single": [0, 0], "multi": [0, 0], "chance": 0.0}
    for p in predictions:
        if p["task"] != "tvg":
            continue
        evs = events[p["video"]]
        kind = "single" if len(evs) == 1 else "multi"
        ious = [etbench.first_iou(p["a"], [e]) or 0.0 for e in evs]  # None: the scorer's Failed, no pick
        out[kind][0] += max(ious) > 0 and evs[ious.index(max(ious))] == p["tgt"]
        out[kind][1] += 1
        out["chance"] += 1 / len(evs) if kind == "multi" else 0.0
    out["chance"] = round(out["chance"], 1)
    return out


def show_picks(results) -> str:
    """The tvg_picks of the kept results as text: a line per row, seed by seed."""
    lines = ["\nTVG: answers that ground the event the query names, seed by seed (one-event videos | videos with "
             "several, and what a uniform pick among their events would get)"]
    for row in dict.fromkeys(r["row"] for r in results):
        got = sorted((r for r in results if r["row"] == row and r.get("tvg_picks")), key=lambda r: r["seed"])
        if got:
            p = [r["tvg_picks"] for r in got]
            lines.append(f"  {row}  {', '.join(f'{x[0]}/{x[1]}' for x in (q['single'] for q in p))}  |  "
                         f"{', '.join(f'{x[0]}/{x[1]}' for x in (q['multi'] for q in p))} "
                         f"(chance {', '.join(str(q['chance']) for q in p)})")
    return "\n".join(lines)


def tables(results) -> dict:
    """{row: {metric: (mean, std, n)}} over the seeds of each row (std: the sample std, 0 for one seed)."""
    out = {}
    for row in ROWS:
        got = [r for r in results if r["row"] == kept_as(row)]
        if not got:
            continue
        out[row] = {}
        for k in METRICS:
            v = [r[k] for r in got]
            out[row][k] = (statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0, len(v))
    return out


def show(summary) -> str:
    """Both tables as text: ours mean ± std (n seeds), the paper's number in brackets."""
    lines = []
    for title, rows in TABLES.items():
        lines += [f"\nTable {title}", f"  {'':<44}" + "".join(f"{k:>22}" for k in METRICS)]
        for row in rows:
            if row not in summary:
                continue
            label, *_, paper = ROWS[row]
            cells = [f"{m:5.1f} ± {s:4.1f} ({p:4.1f})" for (m, s, _), p in
                     zip((summary[row][k] for k in METRICS), paper)]
            n = summary[row][METRICS[0]][2]
            lines.append(f"  {row} {label:<41}" + "".join(f"{c:>22}" for c in cells) + f"   n={n}")
    lines.append("\n  ours: mean ± std over the seeds; (paper): D2VLM-3.8B on E.T.Bench")
    return "\n".join(lines)


def orderings(results) -> list:
    """Each of STEPS, for each metric: the paper's change and ours, seed by seed. Rows trained with
    one seed start from the same weights and see the training samples in the same order, so the
    paired change is free of the part of the seed spread the two rows share. Returns
    [{"step": "A3->A4", "metric", "paper": change, "seeds": [seed, ...], "ours": [change, ...] (the
    seeds both rows have), "holds": how many of them change the way the paper's does (a tie does not)}]."""
    by = {(r["row"], r["seed"]): r for r in results}
    out = []
    for x, y in STEPS:
        fx, fy = kept_as(x), kept_as(y)
        seeds = sorted(s for (row, s) in by if row == fx and (fy, s) in by)
        for i, k in enumerate(METRICS):
            paper = ROWS[y][4][i] - ROWS[x][4][i]
            ours = [by[fy, s][k] - by[fx, s][k] for s in seeds]
            out.append({"step": f"{x}->{y}", "metric": k, "paper": round(paper, 2), "seeds": seeds,
                        "ours": [round(d, 2) for d in ours], "holds": sum(d * paper > 0 for d in ours)})
    return out


def show_orderings(steps) -> str:
    """orderings() as text: per step and metric, the paper's change, ours per seed, and in how many
    seeds ours goes the paper's way."""
    lines = ["\nEach step, seed by seed (ours: the change in each seed; holds: seeds that change the paper's way)",
             f"  {'step':<8} {'metric':<10} {'paper':>7}   {'ours':<28} holds"]
    for o in steps:
        ours = ", ".join(f"{d:+.1f}" for d in o["ours"]) or "-"
        lines.append(f"  {o['step']:<8} {o['metric']:<10} {o['paper']:+7.1f}   {ours:<28} {o['holds']}/{len(o['ours'])}")
    return "\n".join(lines)


def plot(summary, path) -> None:
    plots.ablation_tables(summary, TABLES, METRICS, {r: v[4] for r, v in ROWS.items()}, path)
