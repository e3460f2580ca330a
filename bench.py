"""Speed, memory and learnability figures (not tests). Each ratio is measured within one run, on
this machine, between things that do the same work.

    python bench.py [--json FILE]         one table: frame sampling and its peak memory, the <evi> overhead of a training
                                          step, FPO step / SFT step, generation tokens/s at batch
                                          1 / 8 / 32, the GPU proxies (aten ops and host reads per
                                          step and per token, distinct LLM shapes per epoch:
                                          measure/gpu.py), and (CUDA only) the real-size model
    python bench.py gpu [--json FILE]     every GPU figure in one run (measure/gpu.py): the tiny
                                          recipe on the GPU against 2 CPU threads, the real size's steps,
                                          MFU and memory at micro-batch 1 and 4, generation tokens/s at
                                          batch 1 / 8 / 32, projected E.T.Instruct and E.T.Bench hours
    python bench.py learn [--json FILE]   the embedded default end to end: SFT -> evaluate -> FPO ->
                                          evaluate on the synthetic test split, per-task metrics and
                                          the wall time of each stage; runs/<name>/curves.png
    python bench.py kills [--kills 10]    train.py killed (kill -9) at random moments and resumed: how
                                          many end with the uninterrupted run's weights, bit for bit
    python bench.py ablate [--seeds 3] [--only A1,B2] [--json FILE] [--kept] [--set FIELD=VALUE ...]
                           [--init DIR|none]
                                          the paper's ablation tables in miniature (measure/ablations.py): each
                                          row trained (SFT from the miniature's starting point, or --init),
                                          predicted and scored per seed on the ablation split; resumable;
                                          runs/ablate/ablations.png + curves per run
    python bench.py realwidth [--layers 2 --frames 8]   the real widths with few layers on the CPU
                                          (bf16), from an E.T.Chat stage-2 directory: load, SFT step,
                                          FPO step, save, reload, generation, export

The `<evi>` overhead compares a D2VLM SFT step (video encoder, prefix pass, <evi> injection, suffix
pass, heads, the three losses) with a plain video-LLM step on the same tokens: the same video encoder,
then Phi-3 (same LoRA) once over [text, video tokens] with the token loss only. The decoding
figures (frame sampling, the data loader at real size) are measured by measure/decode.py; what
each figure's code is: measure/__init__.py.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

import checkpoint
from measure import ablations, gpu
from measure.decode import decode_figures, decode_memory_figures, loader_figures
from measure.runs import kill_figures, learn, learn_rows, realwidth_figures
from measure.steps import generation_figures, memory_figures, realsize_figures, step_figures
from support import cli, outputs

PARTS = ("decode", "loader", "memory", "steps", "generate", "host", "shapes", "realsize")  # what --skip may leave out
SCRATCH = ("speed", "realwidth", "kills", "gpu")  # what writes its clips and runs under --clips


# ---------------------------------------------------------------------------------------------

def show(rows):
    """Print the rows as one table, grouped, with the target next to each figure that has one."""
    group = None
    for r in rows:
        g, what, value, unit, target = r[:5]
        if g != group:
            print(f"\n{g}")
            group = g
        before = f"{r[5]:8.1f} ->" if len(r) > 5 else ""
        missing = value is None or math.isnan(value)
        v = "       -" if missing else (f"{value:8.3f}" if abs(value) < 10 else f"{value:8.1f}")
        t = ""
        if target is not None and not missing:
            op, x = target
            t = f"   target {op} {x:g}: {'met' if (value <= x if op == '<=' else value >= x) else 'MISSED'}"
        print(f"  {what:<66} {before}{v} {unit}{t}")


def ablate(args):
    """bench.py ablate: run what is missing, print both tables, draw them, keep the results."""
    rows = [r.strip() for r in args.only.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ablations.ROWS]
    if unknown or not rows:
        raise SystemExit(f"--only {args.only}: " + (f"unknown rows {', '.join(unknown)}" if unknown else "no row")
                         + f" (rows: {', '.join(ablations.ROWS)})")
    if args.jobs is not None and args.jobs < 1:
        raise SystemExit(f"--jobs {args.jobs}: at least 1")
    t = time.perf_counter()
    results = ablations.run_all(rows, args.seeds, extra=["--set", *args.set] if args.set else [], kept_only=args.kept,
                                jobs=args.jobs, start=args.init)
    if not results:
        raise SystemExit(f"no kept ablation result in {ablations.ROOT} for the rows {', '.join(rows)}: run "
                         "`python bench.py ablate` without --kept first")
    summary = ablations.tables(results)
    steps = ablations.orderings(results)
    print(ablations.show(summary))
    print(ablations.show_orderings(steps))
    print(ablations.show_picks(results))
    png = ablations.ROOT / "ablations.png"
    ablations.plot(summary, png)
    spent = sum(r["train_s"] + r["eval_s"] for r in results)
    print(f"\n{len(results)} runs, {spent / 60:.0f} min of training and evaluation in all (this call: "
          f"{(time.perf_counter() - t) / 60:.0f} min); tables: {png}; runs: {ablations.ROOT}")
    if args.json:
        with outputs.output(args.json, made_by(args), "--json") as tmp:
            tmp.write_text(json.dumps({"results": results, "summary": summary, "orderings": steps}, indent=1),
                           encoding="utf-8")
    return summary


def made_by(args) -> dict:
    """What a --json file is made from: which figures (outputs.check_file's made_by)."""
    return {"command": "bench.py", "what": args.what}


def main(argv=None):
    ap = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", nargs="?", default="speed", choices=["speed", "learn", "realwidth", "kills", "ablate", "gpu"])
    ap.add_argument("--seeds", type=cli.at_least(1), default=3, help="ablate: seeds per row (0, 1, ...)")
    ap.add_argument("--kept", action="store_true", help="ablate: tabulate the results kept so far; train nothing")
    ap.add_argument("--jobs", type=cli.at_least(1), help="ablate: runs at a time, one thread each (default: one per core)")
    ap.add_argument("--only", default=",".join(ablations.ROWS), help="ablate: comma-separated rows (A1-A5, B1-B3)")
    ap.add_argument("--set", nargs="+", action="extend", default=[], metavar="FIELD=VALUE",
                    help="ablate: recipe changes applied to every row (train.py --set)")
    ap.add_argument("--init", metavar="DIR|none", help="ablate: where every row's SFT starts (default: the miniature's "
                    "starting point, built on first use; none: random weights)")
    ap.add_argument("--kills", type=cli.at_least(1), default=10, help="kills: how many runs to kill and resume")
    ap.add_argument("--layers", type=cli.at_least(1), default=2, help="realwidth: layers in each of ViT, Q-Former and LLM")
    ap.add_argument("--frames", type=cli.at_least(1), default=8, help="realwidth: frames of the test clip")
    ap.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    ap.add_argument("--repeat", type=cli.at_least(1), default=3, help="timed repetitions of each step")
    ap.add_argument("--clips", default="data/bench", help="where the generated test clips are kept")
    ap.add_argument("--name", help="learn: the run name (default learn-<date>-<time>)")
    ap.add_argument("--seed", type=cli.seed, default=0, help="learn: the seed of SFT and FPO (the starting point's is 0)")
    ap.add_argument("--skip", default="", help=f"comma-separated parts to leave out: {','.join(PARTS)}")
    args = ap.parse_args(argv)
    skip = {x.strip() for x in args.skip.split(",") if x.strip()}
    if skip - set(PARTS):
        raise SystemExit(f"--skip {args.skip}: unknown parts {', '.join(sorted(skip - set(PARTS)))} "
                         f"(parts: {', '.join(PARTS)})")
    if args.json:
        outputs.check_file(args.json, "--json", made_by(args))
    if args.what in SCRATCH:  # its clips and runs are replaced at will: only in a folder of its own
        outputs.claim_folder(args.clips, "--clips", {"command": "bench.py"})
    t = time.perf_counter()
    if args.what == "ablate":
        return ablate(args)
    if args.what == "realwidth":
        rows = realwidth_figures(args.layers, args.frames, out_dir=Path(args.clips) / "realwidth")
    elif args.what == "kills":
        rows = kill_figures(args.kills, out_dir=Path(args.clips) / "kills")
    elif args.what == "gpu":
        if not torch.cuda.is_available():
            raise SystemExit("bench.py gpu: no CUDA GPU here (the CPU proxies of the GPU figures: python bench.py)")
        rows = gpu.gpu_figures(Path(args.clips) / "gpu")
    elif args.what == "learn":
        name, times, metrics, picks = learn(args.name, args.seed)
        rows = learn_rows(times, metrics, picks)
        print(f"\nrun: {Path(checkpoint.RUNS) / name}")
    else:
        rows = []
        if "decode" not in skip:
            rows += decode_figures(args.clips) + decode_memory_figures(args.clips)
        if "loader" not in skip:
            rows += loader_figures(args.clips)
        if "memory" not in skip:
            rows += memory_figures()
        if "steps" not in skip:
            rows += step_figures("tiny", 32, args.repeat) + step_figures("mid", 16, args.repeat)
        if "generate" not in skip:
            rows += generation_figures("tiny", 16)[0]
        if "host" not in skip:
            rows += gpu.host_figures("mid")
        if "shapes" not in skip:
            rows += gpu.shape_figures("tiny")
        if "realsize" not in skip:
            if torch.cuda.is_available():
                rows += realsize_figures()
            else:
                rows.append(("real size (d2vlm-3.8b)", "not measured: needs a CUDA GPU", None, "", None))
    print(f"{sys.platform}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}")
    show(rows)
    print(f"\n({time.perf_counter() - t:.0f} s)")
    if args.json:
        with outputs.output(args.json, made_by(args), "--json") as tmp:
            tmp.write_text(json.dumps([dict(zip(("group", "figure", "value", "unit", "target", "before"), r))
                                       for r in rows], indent=1), encoding="utf-8")


if __name__ == "__main__":
    cli.run(main)
