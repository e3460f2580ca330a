"""Evaluation: inference on a benchmark split or one video, then scoring. Paper: "Experiments".

    python evaluate.py                          the newest default checkpoint (FPO, else SFT) on the
                                                synthetic test split: predictions + metrics + table, in
                                                eval/<checkpoint> beside it (checkpoint.results_dir)
    python evaluate.py --ckpt DIR --data etbench_txt_v1.0.json --videos DIR
    python evaluate.py --score PRED.json [--protocol etchat|strict|d2vlm] [--out metrics.json]
    python evaluate.py --benchmark charades|youcook2 --data TIMECHAT_FILE --videos DIR  (or --score PRED)
    python evaluate.py --video clip.mp4 --question "..." [--plot sim.png]
    python evaluate.py --ckpt RELEASED_DIR --qformer-tokenizer BERT_DIR ...   the released D2VLM weights as
                                                they are (support/released.py; our exports need no tokenizer flag)

The scorers live in the scoring package (docs/scoring.md): scoring/etbench.py (E.T.Bench, protocols
etchat and strict; --protocol d2vlm through scoring/d2vlm.py), scoring/captions.py (dense captioning),
scoring/charades_youcook2.py (Charades-STA, YouCook2), on the shared rules of scoring/rules.py.
"""
from __future__ import annotations

import json
import sys
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm import tqdm

import batches
import checkpoint
import data
import decoding
import event_videos
import model as modeling
from config import configure
from evidence import EVI_END
from scoring.charades_youcook2 import charades_records, score_timechat, youcook2_records
from scoring.etbench import METRICS, PROTOCOLS, load_predictions, prediction_files, score_etbench, table
from support import cli, outputs, released
from video import probe, sample_frames

PREDICTIONS = "predictions"  # the results files: predictions_<name>.json, and METRICS_<name>.json
DEFAULT_DECODING = decoding.DECODINGS[decoding.DEFAULT]  # --decoding's default protocol, what --video answers with


# ---------------------------------------------------------------------------------------------
# Inference

def predict(m, records, videos, *, batch_size=8, decoding_name=decoding.DEFAULT, temperature=None, max_new_tokens=None,
            seed=0, progress=True, on_error="raise", ds=None):
    """Run batched generation on E.T.Bench-format records; returns copies with the response in "a".
    decoding_name: a protocol of decoding.DECODINGS ("greedy", or "release": sampling at 0.2 with
    the repetition penalty on multiple choice, the release's span text); temperature and
    max_new_tokens override its values. Sampling draws from one generator per record, seeded by
    (seed, the record's index): the same answers in any batch size, another set per seed.
    Every video is checked first (batches.VideoDataset; `ds`: that dataset when it was built already,
    before the model was loaded): an unreadable one stops the run, or with on_error="skip" its
    records are left out. A record left out (too long for the model's max_len, text + one token per
    frame; a bad video; a video that fails during the run) gets an empty response, so the scorer
    counts it as Failed; the counts are reported."""
    proto = {**decoding.DECODINGS[decoding_name]}
    proto.update({k: v for k, v in (("temperature", temperature), ("max_new_tokens", max_new_tokens)) if v is not None})
    if ds is None:
        ds = batches.VideoDataset(records, videos, m.tokenizer, m.cfg, on_error=on_error, with_response=False)
    answers = [""] * len(records)
    failed, unfinished = [], {"max_new_tokens": 0, "context": 0}
    # batches of one task each: answers of a kind end together (a batch runs until its longest one ends)
    order = sorted(range(len(ds)), key=lambda j: (str(records[ds.kept[j]].get("task")), j))
    for i in tqdm(range(0, len(ds), batch_size), disable=not progress, desc="generate"):
        samples = [ds[j] for j in order[i:i + batch_size]]
        failed += [s["failed"] for s in samples if "failed" in s]
        ok = [s for s in samples if "failed" not in s]
        if not ok:
            continue
        batch = on_device(m, batches.collate(ok, m.tokenizer, m.qformer_tokenizer, m.cfg, with_response=False))
        rec = [ds.kept[x["index"]] for x in ok]
        with autocast(m):
            outs = decoding.generate(m, batch, proto["max_new_tokens"], temperature=proto["temperature"],
                                     seeds=[seed * len(records) + j for j in rec], penalty=proto["repetition_penalty"],
                                     penalize=[records[j].get("task") in decoding.PENALIZED_TASKS for j in rec],
                                     span_style=proto["span_style"])
        for j, g in zip(rec, outs):
            answers[j] = g["text"]
            if g["stopped"] != "end":
                unfinished[g["stopped"]] += 1
    for message in failed:
        print(f"skipped: {message}", file=sys.stderr)
    if any(unfinished.values()):
        print(f"{sum(unfinished.values())} answers stopped before {data.END}: {unfinished['max_new_tokens']} at "
              f"{proto['max_new_tokens']} new tokens, {unfinished['context']} at the end of the LLM's context "
              f"({m.cfg.llm_max_positions} positions); scored as they are", file=sys.stderr)
    if len(ds) < len(records) or failed:
        print(f"{len(records) - len(ds) + len(failed)} of {len(records)} records have an empty response (Failed): "
              f"{ds.skipped['too_long']} too long for max_len={m.cfg.max_len}, {ds.skipped['bad_video']} with an "
              f"unreadable video, {ds.skipped['bad_duration']} whose duration is not their video's, "
              f"{len(failed)} whose video failed during the run", file=sys.stderr)
    return [{**r, "a": a} for r, a in zip(records, answers)]


def on_device(m, batch) -> dict:
    """A collated batch on the model's device."""
    device = next(m.parameters()).device
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def autocast(m):
    """bf16 autocast for a model on CUDA (model.for_inference holds its frozen weights in bf16), else nothing."""
    device = next(m.parameters()).device
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def video_question(video, question, cfg, tokenizer, max_new_tokens=DEFAULT_DECODING["max_new_tokens"], upright=True):
    """The sample of one question about one video file, {"evidence", "frames", "end": the time of its
    last frame, s} (upright: turned as
    the file's display matrix says, as a player shows it), checked before any weight is loaded: the question is text a record may hold (data.check_text), its timestamps
    ("after 3.0 - 5.0 seconds", which become question <evi>) lie inside the video, the prompt and
    max_new_tokens leave room for frames in cfg.max_len. SystemExit naming --question otherwise."""
    try:
        prompt, qspans = data.extract_times(data.check_text(question, "--question"))
    except data.BadRecord as e:
        raise SystemExit(f"--question: {e.reason}") from None
    reversed_ = [(s, e) for s, e in qspans if e < s]
    if reversed_:
        raise SystemExit(f"--question: the time {reversed_[0][0]:g} - {reversed_[0][1]:g} s ends before it starts")
    end = probe(video)["end"]  # a still image, an unreadable or truncated file: one line naming it
    late = [(s, e) for s, e in qspans if e > end + data.DURATION_TOLERANCE]
    if late:
        raise SystemExit(f"--question: the time {late[0][0]:g} - {late[0][1]:g} s is past the end of {video} "
                         f"({end:.1f} s)")
    budget = cfg.max_len - len(batches.prompt_ids(tokenizer, cfg, [prompt])[0]) - max_new_tokens
    if budget < 1:
        raise SystemExit(f"--question and --max-new-tokens leave no room for frames in max_len={cfg.max_len}")
    frames = sample_frames(video, cfg.fps, cfg.image_size, max_frames=budget, upright=upright)
    evidence = {"prompt": prompt, "question_frames": data.to_frames(qspans, cfg.fps), "response": "", "frames": []}
    return {"evidence": evidence, "frames": frames, "end": end}


def answer_video(m, sample, max_new_tokens=DEFAULT_DECODING["max_new_tokens"],
                 temperature=DEFAULT_DECODING["temperature"]):
    """Answer video_question's sample. Returns generate()'s dict for it, plus "frames" (how many)."""
    batch = on_device(m, batches.collate([sample], m.tokenizer, m.qformer_tokenizer, m.cfg, with_response=False))
    with autocast(m):
        out = decoding.generate(m, batch, max_new_tokens, temperature=temperature)[0]
    return {**out, "frames": len(sample["frames"])}


def plot_evidence(answer, fps, path):
    """A PNG: each <evi>'s probability over time, its chosen span shaded."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
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


def load_model(ckpt, args, cfg, tokenizer):
    """The model of a checkpoint directory (ours or released) with `cfg` (its own, --set applied) and
    the tokenizer the data was checked with, ready for inference (model.for_inference) on the GPU
    when there is one, else on the CPU."""
    m = checkpoint.from_checkpoint(ckpt, args.vision_weights, args.llm_weights, cfg=cfg,
                                   qformer_tokenizer=args.qformer_tokenizer, tokenizer=tokenizer)
    if torch.cuda.is_available():
        modeling.use_cuda_settings()
        return modeling.for_inference(m, "cuda")
    return modeling.for_inference(m, "cpu")


def checkpoint_to_use(args, command: str) -> Path:
    """--ckpt, else the newest intact checkpoint of runs/default (FPO, else SFT; the damaged ones
    passed over, a line each, headed by `command`); --qformer-tokenizer only with a released one."""
    if args.ckpt:
        ckpt = checkpoint.resolve(args.ckpt, "--ckpt")
    else:
        ckpt, passed = checkpoint.latest_checkpoint(checkpoint.DEFAULT_RUN)
        for d, why in passed:
            print(f"{command}: passed over {d} ({why})", file=sys.stderr)
    if args.qformer_tokenizer and not released.is_released(ckpt):
        raise SystemExit(f"--qformer-tokenizer is for a released --ckpt; {ckpt} carries its own tokenizers")
    return ckpt


def add_model_flags(ap) -> None:
    """The flags that say how a --ckpt is loaded (load_model): the weight directories a checkpoint of
    trained tensors only needs, the Q-Former tokenizer a released directory needs, --set."""
    ap.add_argument("--vision-weights")
    ap.add_argument("--llm-weights")
    ap.add_argument("--qformer-tokenizer", help="with a released --ckpt: bert-base-uncased's tokenizer directory (or "
                                                "InstructBLIP's qformer_tokenizer/)")
    ap.add_argument("--set", nargs="+", action="extend", default=[], metavar="FIELD=VALUE",
                    help="override the checkpoint's D2VLMConfig fields, e.g. --set select_ratio=0.5")


def get_args(argv=None):
    ap = cli.ArgumentParser(description="D2VLM evaluation: inference on E.T.Bench-format data, and scoring.")
    ap.add_argument("--score", metavar="PRED", help="score a predictions file (or folder) instead of running the model")
    ap.add_argument("--protocol", choices=list(PROTOCOLS), default=PROTOCOLS[0],
                    help="etchat: the original E.T.Bench rules; strict: letter final for multiple choice; "
                         "d2vlm: the </evi>-aware rules of the D2VLM release, with *_evi evidence metrics")
    ap.add_argument("--benchmark", choices=["etbench", "charades", "youcook2"], default="etbench",
                    help="charades / youcook2: --data is TimeChat's test / val .caption_coco_format.json "
                         "(inference, and the ground truth of the scoring); --score reads tvg/charades_sta or "
                         "dvc/youcook2 predictions and needs --data")
    ap.add_argument("--out", help="metrics JSON (default: beside the predictions)")
    ap.add_argument("--results", metavar="DIR", help="inference: the folder of the predictions and metrics (default: "
                                                     "eval/<checkpoint name> beside the checkpoint, never inside it)")
    ap.add_argument("--ckpt", help="checkpoint directory (default: the newest of runs/default/fpo, else sft)")
    add_model_flags(ap)
    ap.add_argument("--data", help="E.T.Bench-format annotation file (default: the synthetic test split)")
    ap.add_argument("--videos")
    ap.add_argument("--on-error", choices=list(data.ON_ERROR), default="raise",
                    help="an unreadable video: stop, or leave its records out (empty responses, counted Failed)")
    ap.add_argument("--batch-size", type=cli.at_least(1), default=8)
    ap.add_argument("--decoding", choices=list(decoding.DECODINGS), default=decoding.DEFAULT,
                    help="greedy (default: deterministic, short answers) or release: the D2VLM release's protocol, "
                         "sampling at 0.2, repetition penalty 1.2 on rar/eca/rvq, 2048 new tokens, its span text "
                         "'s - e ' in frames (README: the protocol table)")
    ap.add_argument("--seed", type=cli.seed, default=0, help="sampling: the seed of this run's draws")
    ap.add_argument("--temperature", type=cli.non_negative, help="overrides the protocol's (0 = greedy)")
    ap.add_argument("--max-new-tokens", type=cli.at_least(1), help="overrides the protocol's")
    ap.add_argument("--video", help="answer --question about this one video file")
    ap.add_argument("--question")
    ap.add_argument("--plot", metavar="PNG", help="with --video: plot each <evi>'s similarity over time")
    ap.add_argument("--as-stored", action="store_true", help="with --video: the frames as the file stores them, "
                    "not turned as its display matrix says (a phone's portrait clip); training and the benchmarks "
                    "read them so, as the release does")
    args = ap.parse_args(argv)
    if args.video and not args.question:
        raise SystemExit("--video needs --question")
    if args.plot:
        from matplotlib.backend_bases import FigureCanvasBase
        kinds = FigureCanvasBase.get_supported_filetypes()
        if Path(args.plot).suffix.lstrip(".").lower() not in kinds:
            raise SystemExit(f"--plot {args.plot}: a picture file, ending in one of {', '.join('.' + k for k in kinds)}")
    if args.score:
        if args.benchmark == "etbench" and args.data:
            raise SystemExit("--data is the ground truth of --benchmark charades / youcook2; E.T.Bench predictions "
                             "carry their own, drop --data")
        if args.benchmark != "etbench" and not args.data:
            raise SystemExit(f"--benchmark {args.benchmark} --score needs --data, TimeChat's ground-truth "
                             ".caption_coco_format.json: the release scores every video it names, those without a "
                             "prediction included")
    return args


def sampled(args) -> bool:
    """Whether the answers are sampled (a temperature above 0), so that the seed makes them."""
    return (decoding.DECODINGS[args.decoding]["temperature"] if args.temperature is None else args.temperature) > 0


def results_name(args, data) -> str:
    """What one evaluation's results are named by: the data file's stem, then whatever else made them
    that is not the default (the decoding protocol, --temperature, --max-new-tokens, the seed when
    answers are sampled, --set), so that two evaluations of a checkpoint never share a file."""
    parts = [Path(data).stem]
    if args.decoding != decoding.DEFAULT:
        parts.append(args.decoding)
    if args.temperature is not None:
        parts.append(f"temperature{args.temperature:g}")
    if args.max_new_tokens is not None:
        parts.append(f"max{args.max_new_tokens}")
    if sampled(args):
        parts.append(f"seed{args.seed}")
    return "_".join(parts + [x.replace("/", "_") for x in args.set])


def metrics_path(args, scored: Path, name: str | None = None) -> Path:
    """The metrics file of scoring `scored` (a predictions file or folder) under args.protocol:
    metrics_<name>[_<protocol>].json beside it (a folder: in it), <name> the predictions file's
    (predictions_<name>.json)."""
    if name is None and scored.is_file():
        name = scored.stem[len(PREDICTIONS) + 1:] if scored.stem.startswith(PREDICTIONS + "_") else scored.stem
    protocol = f"_{args.protocol}" if args.benchmark == "etbench" and args.protocol != PROTOCOLS[0] else ""
    return (scored.parent if scored.is_file() else scored) / f"{METRICS}{'_' + name if name else ''}{protocol}.json"


def _abs(p, flag):
    """A path as a made_by records it: resolved, a string (`flag` names it in an error)."""
    return None if p is None else str(outputs.resolved(p, flag))


def scored_by(args, scored) -> dict:
    """What a metrics file is made from (outputs.check_file's made_by): the predictions, the rules."""
    return {"command": "evaluate.py", "scores": _abs(scored, "--score"), "benchmark": args.benchmark,
            "protocol": args.protocol, "data": _abs(args.data, "--data") if args.benchmark != "etbench" else None}


def predicted_by(args, ckpt, what="predictions") -> dict:
    """What a predictions file (or a --plot) is made from: the checkpoint, the data or the video and
    question, the decoding and the settings."""
    inputs = ({"video": _abs(args.video, "--video"), "question": args.question} if what == "plot" else
              {"data": _abs(args.data, "--data"), "videos": _abs(args.videos, "--videos"), "benchmark": args.benchmark,
               "on_error": args.on_error})
    return {"command": "evaluate.py", "output": what, "checkpoint": _abs(ckpt, "--ckpt"), **inputs,
            "decoding": args.decoding, "temperature": args.temperature, "max_new_tokens": args.max_new_tokens,
            "seed": args.seed if sampled(args) else None, "set": args.set}


def inputs_of(args, ckpt=None) -> dict:
    """The paths evaluate.py reads, {flag: path}: none of them is an output."""
    return {"--score": args.score, "--data": args.data, "--video": args.video, "--ckpt": ckpt, "--videos": args.videos}


def main(argv=None):
    args = get_args(argv)
    if args.score:
        scored = Path(args.score)
        if not scored.exists():
            raise SystemExit(f"--score {args.score}: not found")
        out = Path(args.out) if args.out else metrics_path(args, scored)
        made = scored_by(args, scored)
        outputs.check_file(out, "--out", made, inputs_of(args))
        files, skipped = prediction_files(scored)
        if skipped:
            print(f"--score {args.score}: read {len(files)} predictions file(s); left out {', '.join(skipped)} "
                  "(metrics files, hidden files and other extensions)", file=sys.stderr)
        records = load_predictions(args.score, require=("idx",) if args.benchmark == "charades" else ())
        return score(args, records, out, made)
    ckpt = checkpoint_to_use(args, "evaluate")
    cfg = configure(checkpoint.read_config(ckpt), args.set)
    if args.video:
        if args.out or args.results:
            raise SystemExit("--out and --results are the files of a benchmark run; with --video the answer is printed "
                             "(and --plot drawn)")
        if args.plot:
            outputs.check_file(args.plot, "--plot", predicted_by(args, ckpt, "plot"), inputs_of(args, ckpt))
        proto = decoding.DECODINGS[args.decoding]
        max_new = args.max_new_tokens or proto["max_new_tokens"]
        tokenizer = checkpoint.tokenizer_of(ckpt, args.vision_weights, args.llm_weights)
        # checked before any weight is loaded; the frames turned upright unless --as-stored
        sample = video_question(args.video, args.question, cfg, tokenizer, max_new, upright=not args.as_stored)
        m = load_model(ckpt, args, cfg, tokenizer)
        answer = answer_video(m, sample, max_new, proto["temperature"] if args.temperature is None else args.temperature)
        print(answer["text"])
        for k, (s, e) in enumerate(answer["spans"]):
            print(f"  <evi> {k + 1}: {s:.1f} - {e:.1f} s (peak probability {max(answer['probs'][k]):.2f})")
        if args.plot:
            with outputs.output(args.plot, predicted_by(args, ckpt, "plot"), "--plot") as tmp:
                plot_evidence(answer, m.cfg.fps, tmp)
            print(f"plot: {args.plot}", file=sys.stderr)
        return
    if args.plot or args.as_stored:
        raise SystemExit(f"{'--plot' if args.plot else '--as-stored'} is for one video: add --video and --question")
    if args.data is None:
        _, test = event_videos.ensure_synthetic(event_videos.SYNTHETIC)
        args.data, args.videos = str(test), args.videos or str(test.parent / "videos")
    if args.videos is None:
        raise SystemExit("--videos is required with --data")
    results = Path(args.results) if args.results else checkpoint.results_dir(ckpt)
    outputs.check_folder(results, "--results", inputs_of(args, ckpt))
    name = results_name(args, args.data)
    pred_path = results / f"{PREDICTIONS}_{name}.json"
    out = Path(args.out) if args.out else metrics_path(args, results, name)
    made, scored = predicted_by(args, ckpt), scored_by(args, pred_path)
    outputs.check_file(pred_path, "--results", made, inputs_of(args, ckpt))
    outputs.check_file(out, "--out", scored, inputs_of(args, ckpt))
    # ---- the data, checked in full (records, videos, lengths) before any weight is loaded
    tokenizer = checkpoint.tokenizer_of(ckpt, args.vision_weights, args.llm_weights)
    if args.benchmark == "charades":
        annotations = charades_records(args.data)
        for r in annotations:  # the duration the converter leaves out: read it from the video (checked on the way)
            info = probe(Path(args.videos) / r["video"])
            r["duration"] = info["declared"] or info["end"]
    elif args.benchmark == "youcook2":
        annotations = youcook2_records(args.data)
    else:
        annotations = list(data.load_records(args.data))  # every record validated (one-line error naming it)
    ds = batches.VideoDataset(annotations, args.videos, tokenizer, cfg, on_error=args.on_error, with_response=False)
    results.mkdir(parents=True, exist_ok=True)  # a folder that cannot be written fails now, not after inference
    m = load_model(ckpt, args, cfg, tokenizer)
    records = predict(m, annotations, args.videos, batch_size=args.batch_size, decoding_name=args.decoding,
                      temperature=args.temperature, max_new_tokens=args.max_new_tokens, seed=args.seed,
                      on_error=args.on_error, ds=ds)
    with outputs.output(pred_path, made, "--results") as tmp:
        tmp.write_text(json.dumps(records, indent=1), encoding="utf-8")
    print(f"predictions: {pred_path}", file=sys.stderr)
    return score(args, records, out, scored)


def score(args, records, out, made):
    """Score predictions (with args.benchmark, args.protocol), print the table, write the metrics to
    `out` (made: what they are made from, outputs.check_file's)."""
    if args.benchmark != "etbench":
        metrics, note = score_timechat(args.benchmark, records, args.data)
        print(note, file=sys.stderr)
        if args.benchmark == "charades":
            text = "\n".join(f"{k} = {metrics[k]}" for k in ("R1@0.3", "R1@0.5", "R1@0.7", "mIoU")) \
                + f"\n({metrics['num']} of {metrics['Total']} responses with a span; {metrics['Failed']} Failed)"
        else:
            text = "\n".join(f"{k}: {v}" for k, v in metrics.items())
    else:
        if args.protocol == "d2vlm":
            plain = sum(EVI_END not in r["a"] for r in records)
            if plain:
                print(f"{plain} of {len(records)} answers hold no {EVI_END}: the d2vlm protocol scores only what "
                      f"follows it, so they count as Failed (a model that does not write its evidence first: "
                      "--protocol etchat)", file=sys.stderr)
        metrics = score_etbench(records, args.protocol)
        text = table(metrics)
    with outputs.output(out, made, "--out") as tmp:
        tmp.write_text(json.dumps(metrics, indent=1), encoding="utf-8")
    print(text)
    print(f"metrics: {out}", file=sys.stderr)
    return metrics


if __name__ == "__main__":
    cli.run(main)
