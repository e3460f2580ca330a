"""Training: `torchrun train.py --stage sft`, then `--stage fpo`. Paper: "Loss & Training", "Factorized
Preference Optimization" (docs/paper.md; the recipe's numbers: docs/design.md#training-recipe).

Top to bottom as a run goes: main (the arguments, the process group, the miniature's starting point
built first when a tiny SFT run needs it), then train: the run directory and where it starts, the
data checked in full, the model and its optimizer, the objective, the loop, the summary.

With no arguments the SFT stage trains the tiny preset on the synthetic event videos (generated
under data/synthetic on first use), from the miniature's starting point runs/start/pretrain (built
first when missing: `--stage pretrain`, pretrain.py; `--init none` starts from random weights); on a
2-core CPU that takes a few minutes and the model grounds the event a question names. `--stage fpo`
then continues from the newest SFT checkpoint of the run on preference pairs made from the same
data (synth.py), or read from --pairs. The three stages share this loop; they differ in the dataset
(pairs are packed: prompt, chosen, rejected in one row), what trains (pretrain.set_trainable) and
the objective (losses.sft_objective, pretrain too / fpo.objective). The real-size run on
E.T.Instruct-164K, 4 GPUs:

    torchrun --nproc_per_node 4 train.py --stage sft --preset d2vlm-3.8b \\
        --vision-weights DIR --llm-weights DIR --data et_instruct_164k_txt.json --videos DIR
    torchrun --nproc_per_node 4 train.py --stage fpo --preset d2vlm-3.8b --vision-weights DIR --llm-weights DIR \
        --data et_instruct_164k_txt.json --videos DIR --set batch_size=8

or, as the paper starts, from E.T.Chat stage 2 (a released directory; support/released.py):

    torchrun --nproc_per_node 4 train.py --stage sft --init ETChat-Phi3-Mini-Stage-2 --qformer-tokenizer DIR \
        --data et_instruct_164k_txt.json --videos DIR

DDP comes from torchrun's environment (gloo on CPU, NCCL on CUDA; multi-node through torchrun's own
flags). Checkpoints go to runs/<name>/<stage>/step_NNNNNN/ (written under a temporary name, then
renamed; the last --keep are kept; what they hold: checkpoint.py). --resume picks up the newest intact
one and continues exactly as if the run had not stopped, as the stage, data and config it ran with
(support/rundir.py). A JSONL log of every logged step lands in runs/<name>/<stage>/log.jsonl.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path, PurePath

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DistributedSampler
from tqdm import tqdm

import batches
import checkpoint as ckpt
import data
import event_videos
import fpo
import losses
import model as modeling
import pretrain
import synth
from config import PRESETS, configure
from support import cli, outputs
from support.rundir import (Proc, check_state, claim, cut_log, gather, param_digest, refuse_used, restore,
                            run_tokenizer, save, settings, starting_model, starting_point, summarize)

NO_INIT = "none"  # --init none: random weights, not the miniature's starting point
START = "start"  # the run name of the miniature's starting point: <out>/start/pretrain (start_dir)
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16 per GPU, for MFU


def get_args(argv=None):
    ap = cli.ArgumentParser(description="Train D2VLM: the starting point (pretrain), SFT, then FPO.")
    ap.add_argument("--stage", choices=["pretrain", "sft", "fpo"], default="sft")
    ap.add_argument("--preset", choices=sorted(PRESETS),
                    help="the config (default: tiny; d2vlm-3.8b with a released --init, whose widths it reads)")
    ap.add_argument("--set", nargs="+", action="extend", default=[], metavar="FIELD=VALUE",
                    help="override D2VLMConfig fields, e.g. --set w_cons=0 lr_lora=1e-4 batch_size=8")
    ap.add_argument("--data", help="annotation file (E.T.Instruct-164K txt/vid or the synthetic train.json); "
                                   "default: the synthetic set, generated on first use")
    ap.add_argument("--videos", help="folder the records' `video` paths are relative to")
    ap.add_argument("--vision-weights", help="local InstructBLIP checkpoint directory (vision + Q-Former)")
    ap.add_argument("--llm-weights", help="local Phi-3-mini-4k-instruct directory (model + tokenizer)")
    ap.add_argument("--init", help="start from this directory: a released one (E.T.Chat stage 2 as the paper does, "
                                   "or D2VLM; support/released.py), one of our checkpoints, or a run folder (its newest "
                                   "intact checkpoint); none: random weights (default: sft on the synthetic set, the "
                                   "miniature's starting point; fpo, the newest intact checkpoint of runs/<name>/sft)")
    ap.add_argument("--qformer-tokenizer", help="with a released --init: bert-base-uncased's tokenizer directory "
                                                "(or InstructBLIP's qformer_tokenizer/); upstream's holds none")
    ap.add_argument("--pairs", help="fpo: preference pairs from synth.py (default: made from --data, seeded)")
    ap.add_argument("--ref", choices=["none", "sft"], default="none",
                    help="fpo reference: none (as released) or the SFT model (log-probs computed once, before step 1)")
    ap.add_argument("--beta", type=cli.positive, help=f"fpo: the DPO temperature (default cfg.beta = {PRESETS['tiny'].beta})")
    ap.add_argument("--on-error", choices=list(data.ON_ERROR), default="raise", help="bad records: stop or skip and count")
    ap.add_argument("--name", help=f"run name: checkpoints and log under runs/<name>/<stage> (default: {ckpt.DEFAULT_NAME}; "
                                   f"pretrain: {START}, the starting point tiny SFT runs on the synthetic set start from)")
    ap.add_argument("--out", default=ckpt.RUNS)
    ap.add_argument("--max-steps", type=cli.at_least(1),
                    help="optimizer steps in all (default: cfg.epochs epochs, FPO: cfg.fpo_epochs)")
    ap.add_argument("--stop-after", type=cli.at_least(1), help="save and exit after this step, as if interrupted "
                                                               "(--resume goes on)")
    ap.add_argument("--resume", nargs="?", const="latest", help="continue from the newest intact checkpoint of the run, "
                                                               "or from DIR (a checkpoint of this stage)")
    ap.add_argument("--save-every", type=cli.at_least(1), default=200, help="steps between checkpoints (and one at the end)")
    ap.add_argument("--keep", type=cli.at_least(1), default=3, help="checkpoints to keep")
    ap.add_argument("--log-every", type=cli.at_least(1), default=10)
    ap.add_argument("--workers", type=cli.at_least(0), help="data-loading processes per rank")
    ap.add_argument("--seed", type=cli.seed, default=0)
    ap.add_argument("--peak-tflops", type=cli.positive, default=PEAK_TFLOPS["H100"],
                    help="accelerator peak for MFU (H100 bf16 dense)")
    args = ap.parse_args(argv)
    if args.name is None:
        args.name = START if args.stage == "pretrain" else ckpt.DEFAULT_NAME
    name = PurePath(args.name)
    if not args.name or name.is_absolute() or ".." in name.parts:
        raise SystemExit(f"--name {args.name!r}: a run name is a folder inside --out (relative, without '..')")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise SystemExit(f"--out {args.out}: not a folder (the runs go under it)")
    if args.init and args.resume:
        raise SystemExit(f"--init {args.init} with --resume: a resumed run goes on from its own checkpoint, which "
                         "holds where it started; drop --init")
    outputs.check_folder(args.out, "--out")
    why = outputs.guarded(Path(args.out) / args.name)
    if why:
        raise SystemExit(f"--out {args.out} --name {args.name}: the run folder would be {why}, where only that run "
                         "writes; pick another --out or --name")
    return args


def main(argv=None):
    args = get_args(argv)
    proc = setup_distributed()
    if uses_miniature_start(args):  # a tiny SFT run on the synthetic set starts where the paper's does, in miniature
        start = miniature_start(args, proc)
        if start is None:  # not built yet: the pretrain stage builds it first, once
            train(get_args(["--stage", "pretrain", "--name", START, "--out", args.out]), proc)
            start = ckpt.checkpoints(start_dir(args.out))[-1]
        args.init = str(start)
    if args.init == NO_INIT:  # random weights, as before the starting point existed
        args.init = None
    train(args, proc)
    if proc.ddp:  # train() ended with a barrier: every rank is done with the group
        dist.destroy_process_group()


def setup_distributed() -> Proc:
    """DDP from torchrun's environment (gloo on CPU, NCCL on CUDA); one process without it."""
    ddp, cuda = "RANK" in os.environ, torch.cuda.is_available()
    if ddp:
        dist.init_process_group("nccl" if cuda else "gloo")
        rank, world, local = dist.get_rank(), dist.get_world_size(), int(os.environ["LOCAL_RANK"])
    else:
        rank, world, local = 0, 1, 0
    device = torch.device(f"cuda:{local}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
        modeling.use_cuda_settings()
    return Proc(ddp=ddp, rank=rank, world=world, local=local, device=device)


def train(args, proc: Proc):
    """One stage of training (args: get_args's) in the process group set up by main."""
    master = proc.master
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if proc.cuda else nullcontext()
    run_dir = Path(args.out) / args.name / args.stage
    lock = claim(run_dir, proc)  # held until the run ends
    cfg, init, resume, st = starting_point(args, run_dir, proc.world)  # a resumed run: its trainer state checked
    if master and resume:
        cut_log(run_dir / "log.jsonl", ckpt.step_of(resume))
    resolve_data(args, proc)

    # ---- the data, checked in full (records, videos, lengths) before any weight is loaded
    tokenizer = run_tokenizer(args, cfg, init, resume)
    ds = training_data(args, cfg, tokenizer, run_dir, master)
    data_sha256 = outputs.sha256(args.pairs if args.stage == "fpo" and args.pairs else args.data)  # what resume checks
    sampler = DistributedSampler(ds, num_replicas=proc.world, rank=proc.rank, shuffle=True, seed=args.seed)
    micro_per_epoch = math.ceil(len(sampler) / cfg.batch_size)
    epochs = {"pretrain": cfg.pretrain_epochs, "sft": cfg.epochs, "fpo": cfg.fpo_epochs}[args.stage]
    total = args.max_steps or (max(1, math.ceil(epochs * math.ceil(micro_per_epoch / cfg.grad_accum))) if epochs else 0)
    if resume:  # what depends on the data: the resumed run read the same
        check_state(st, resume, total=total, data_sha256=data_sha256)

    # ---- model, optimizer, objective
    bare, full = starting_weights(args, cfg, init, resume, tokenizer, proc)  # bare: the model; `model`: its DDP wrapper
    opt = make_optimizer(bare, cfg, fused=proc.cuda, scale=cfg.fpo_lr_scale if args.stage == "fpo" else 1.0)
    if resume:
        restore(resume, st, bare, opt, proc)
    step, epoch, micro = (st["step"], st["epoch"], st["micro"]) if resume else (0, 0, 0)
    model = DDP(bare, device_ids=[proc.local] if proc.cuda else None) if proc.ddp else bare
    collate = partial(batches.collate, tokenizer=bare.tokenizer, qformer_tokenizer=bare.qformer_tokenizer, cfg=cfg)
    ref = None
    if args.stage == "fpo" and args.ref == "sft":  # the SFT model's log-probs, computed once, kept in the checkpoints
        ref = st["ref_logprobs"].to(proc.device) if resume else fpo.reference_logprobs(bare, ds, collate, cfg, proc, autocast)
    objective = (partial(fpo.objective, cfg=cfg, ref=ref) if args.stage == "fpo"
                 else partial(losses.sft_objective, cfg=cfg))  # SFT's, the pretrain stage's too
    workers = args.workers if args.workers is not None else min(4, max(0, (os.cpu_count() or 1) // proc.world - 1))
    stream = batches.micro_batches(ds, sampler, collate, batch_size=cfg.batch_size, workers=workers,
                                   pin_memory=proc.cuda, start=(epoch, micro))
    if master:
        n_train = sum(p.numel() for p in bare.parameters() if p.requires_grad)
        print(f"{args.stage}: {len(ds)} samples ({ds.skipped_text()} left out; {len(ds.past_end)} with a span past "
              f"their video's end), {proc.world} process(es) x batch {cfg.batch_size} x accumulation {cfg.grad_accum}, "
              f"{total} steps, {n_train:,} trained parameters, device {proc.device.type}", file=sys.stderr)
        log = open(run_dir / "log.jsonl", "a" if resume else "w")
    bar = tqdm(total=total, initial=step, disable=not master, desc=args.stage, dynamic_ncols=True,
               mininterval=0.5 if sys.stderr.isatty() else 30)
    meter = Meter(("loss", "sft", "gnd", "cons") + (fpo.METRICS if args.stage == "fpo" else ()), bare, proc,
                  args.peak_tflops)
    t_start, first_step, saved_to, last = time.time(), step, resume, None
    model.train(args.stage != "fpo" or cfg.fpo_dropout)  # FPO: no dropout (TRL's DPO) unless as released
    state = {"world_size": proc.world, "total": total, "seed": args.seed, "ref": args.ref, "stage": args.stage,
             "data_sha256": data_sha256}
    if ref is not None:
        state["ref_logprobs"] = ref.cpu()
    if total == 0:  # the pretrain stage's encoder alignment alone (pretrain_epochs=0): its checkpoint is step 0
        saved_to = save(run_dir, bare, opt, {**state, "step": 0, "epoch": 0, "micro": 0}, proc, full=full, keep=args.keep)

    # ---- the loop
    while step < total:
        # one optimizer step: up to grad_accum micro-batches, never across an epoch's end
        k = min(cfg.grad_accum, micro_per_epoch - micro)
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * lr_factor(step, total, cfg.warmup)
        step_loss = torch.zeros((), dtype=torch.float64, device=proc.device)
        for i in range(k):
            batch, failed, empty = batches.readable(stream, micro_per_epoch)
            for message in failed:  # a video that broke after the pre-flight check
                print(f"skipped: {message}", file=sys.stderr)
            meter.skipped, meter.replaced = meter.skipped + len(failed), meter.replaced + empty
            batch = {n: t.to(proc.device, non_blocking=True) for n, t in batch.items()}
            with model.no_sync() if proc.ddp and i < k - 1 else nullcontext(), autocast:
                terms = objective(model(batch), batch)
            (terms["loss"] / k).backward()
            meter.add(terms, batch, k)
            step_loss += terms["loss"].detach().double()
        grad_norm = torch.nn.utils.clip_grad_norm_(bare.parameters(), cfg.grad_clip)
        stop_if_not_finite(step, step_loss, grad_norm, proc, saved_to)  # before the update: the weights stay good
        opt.step()
        opt.zero_grad(set_to_none=True)
        step, micro, meter.steps = step + 1, micro + k, meter.steps + 1
        if micro == micro_per_epoch:
            epoch, micro = epoch + 1, 0
        bar.update(1)
        stop = args.stop_after is not None and step >= args.stop_after

        # log: means over the ranks and the steps since the last log
        if step % args.log_every == 0 or step == total or stop:
            last = meter.row(step, epoch, grad_norm, opt)
            if master:
                log.write(json.dumps(last) + "\n")
                log.flush()
                bar.set_postfix({t: last[t] for t in ("loss", "gnd", "sft", "rewards/accuracies") if t in last})

        # checkpoint
        if step % args.save_every == 0 or step == total or stop:
            saved_to = save(run_dir, bare, opt, {**state, "step": step, "epoch": epoch, "micro": micro}, proc,
                            full=full, keep=args.keep)
        if stop:
            break
    bar.close()

    # ---- summary: every rank's trained weights must be bit-identical
    digests = gather(param_digest(bare), proc.world)
    if master:
        summarize(log, args.stage, step=step, total=total, done=step - first_step, wall=time.time() - t_start,
                  last=last, saved_to=saved_to, digests=digests)
    if proc.ddp:
        dist.barrier()
    if lock is not None:
        lock.close()
    if len(set(digests)) > 1:
        raise SystemExit("the ranks' trained weights differ: DDP went out of sync")


# ---------------------------------------------------------------------------------------------
# The starting point of the miniature

def uses_miniature_start(args) -> bool:
    """A tiny SFT run on the synthetic set, from no directory: it starts from the miniature's starting point."""
    return (args.stage == "sft" and args.data is None and args.init is None and not args.resume
            and args.vision_weights is None and args.llm_weights is None and (args.preset or "tiny") == "tiny")


def start_dir(out) -> Path:
    """Where the miniature's starting point is kept under the runs folder `out`: <out>/start/pretrain."""
    return Path(out) / START / "pretrain"


def intact_start(out) -> tuple:
    """(the newest intact checkpoint of the miniature's starting point under the runs folder `out`,
    or None when it has none yet; the damaged ones passed over). SystemExit when it has checkpoints
    and all are damaged: building it again is the user's call."""
    start = start_dir(out)
    found, passed = ckpt.newest_intact(start)
    if found is None and passed:
        raise SystemExit(f"{start}: the miniature's starting point is damaged ({passed[0][0].name}: {passed[0][1]}); "
                         f"remove {start} to build it again (a few minutes), or start elsewhere with --init DIR|none")
    return found, passed


def miniature_start(args, proc: Proc) -> Path | None:
    """The newest intact checkpoint of <out>/start/pretrain (pretrain.py), or None when main must build
    it first (`train.py --stage pretrain`, seed 0), as the synthetic set is made on first use; then
    what would stop the SFT run is checked before minutes go into it. One line says which."""
    start = start_dir(args.out)
    found, passed = intact_start(args.out)
    if found is None:
        configure(PRESETS["tiny"], settings(args))
        refuse_used(Path(args.out) / args.name / args.stage)
        if proc.master:
            print(f"sft: building the miniature's starting point in {start} first (once; `--init none` starts "
                  "from random weights)", file=sys.stderr)
    elif proc.master:
        print(f"sft: starting from the miniature's starting point {found}"
              + "".join(f"; passed over {d.name} ({why})" for d, why in passed) + " (`--init none`: random weights)",
              file=sys.stderr)
    return found


# ---------------------------------------------------------------------------------------------
# The data

def resolve_data(args, proc: Proc) -> None:
    """--data / --videos, defaulting to the synthetic set (generated by rank 0 on first use)."""
    if args.data is None:
        if proc.master:
            event_videos.ensure_synthetic(event_videos.SYNTHETIC)
            if args.stage == "pretrain" and not (event_videos.SYNTHETIC / event_videos.PRETRAIN).is_file():
                event_videos.make_pretrain(event_videos.SYNTHETIC, flag="the synthetic set's folder")
        if proc.ddp:
            dist.barrier()
        name = event_videos.PRETRAIN if args.stage == "pretrain" else "train.json"
        args.data, args.videos = str(event_videos.SYNTHETIC / name), args.videos or str(event_videos.SYNTHETIC / "videos")
    if args.videos is None:
        raise SystemExit("--videos is required with --data (the folder the records' `video` paths are relative to)")


def training_data(args, cfg, tokenizer, run_dir, master):
    """The stage's dataset: the records of --data (SFT) that pass cfg's training-data filters, or
    preference pairs (FPO), read from --pairs or made from those records with the run's seed (the
    same on every rank; written to run_dir/pairs.json)."""
    if args.stage == "fpo" and args.pairs:
        records = synth.load_pairs(args.pairs, cfg.fps)
    else:
        records = annotations = filtered(data.load_records(args.data, args.on_error), cfg, master)
    if args.stage == "fpo" and not args.pairs:
        records = synth.make_pairs([data.to_evidence(r, cfg.fps) for r in annotations], args.seed)
        if master:
            synth.save_pairs(records, run_dir / "pairs.json")
            print(f"fpo: {len(records)} pairs from {len(annotations)} records ("
                  + ", ".join(f"{k} {records.counts.get(k, 0)}" for k in synth.KINDS)
                  + f"), no kind applies to {records.unusable}; written to {run_dir / 'pairs.json'}", file=sys.stderr)
    if not records:
        raise SystemExit(f"{args.pairs or args.data}: no records left to train on (filters, or no pair could be made)")
    ds = batches.VideoDataset(records, args.videos, tokenizer, cfg, on_error=args.on_error)
    if len(ds) == 0:
        raise SystemExit(f"{args.pairs or args.data}: no usable records ({ds.skipped_text()} left out)")
    return ds


def filtered(records, cfg, master):
    """The records that pass cfg's training-data filters (batches.filter_records), what they left out reported."""
    if not (cfg.min_duration or cfg.max_duration or cfg.max_answer_words):
        return records
    kept, n = batches.filter_records(records, cfg)
    if master:
        print(f"{records.path}: kept {len(kept)} of {len(records)} records; filtered out {n['short']} with videos "
              f"shorter than {cfg.min_duration:g} s, {n['long']} longer than {cfg.max_duration:g} s, {n['wordy']} "
              f"with answers over {cfg.max_answer_words} words", file=sys.stderr)
    return kept


# ---------------------------------------------------------------------------------------------
# The model and the optimizer

def starting_weights(args, cfg, init, resume, tokenizer, proc: Proc):
    """(model, full): the model the stage starts from on the device (FPO as released: the SFT LoRA
    merged, a fresh one; pretrain: the encoder aligned first), frozen weights in bf16 on CUDA;
    full: whether checkpoints must hold every tensor. Seeds the global RNG for this rank's dropout."""
    torch.manual_seed(args.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    model, full = starting_model(args, cfg, init, resume, tokenizer, proc.master)
    model = model.to(proc.device)
    if args.stage == "fpo" and cfg.fpo_start == "merged" and not resume:  # as released; a resume loads it all
        modeling.merge_and_fresh_lora(model, cfg)
    if args.stage == "pretrain":
        if not resume:  # phase 1: the encoder's image-text alignment (the same on every rank)
            pretrain.align_encoder(model, Path(args.data).with_name(event_videos.PRETRAIN_FRAMES), args.videos, cfg,
                                   args.seed, lr_factor)
        pretrain.set_trainable(model)  # phase 2: captions and questions, the ViT frozen again
    if proc.cuda:  # frozen weights in bf16 (run under bf16 autocast), trained ones in fp32
        modeling.hold_frozen_in(model, torch.bfloat16)
    # frozen weights not those of the weight directories (random, released, merged, aligned) go into checkpoints
    full = full or args.stage == "pretrain" or (args.stage == "fpo" and cfg.fpo_start == "merged")
    torch.manual_seed(args.seed + proc.rank)  # but other dropout masks on each rank
    return model, full


def make_optimizer(model, cfg, fused=False, scale=1.0):
    """AdamW, two groups: LoRA at cfg.lr_lora, every other trainable tensor at cfg.lr_other (both
    times `scale`: cfg.fpo_lr_scale in the FPO stage)."""
    lora = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
    other = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
    lr_lora, lr_other = cfg.lr_lora * scale, cfg.lr_other * scale
    return torch.optim.AdamW([{"params": lora, "base_lr": lr_lora, "lr": lr_lora},
                              {"params": other, "base_lr": lr_other, "lr": lr_other}],
                             weight_decay=cfg.weight_decay, fused=fused)


def lr_factor(step, total, warmup):
    """Linear warm-up over the first `warmup` fraction of the steps, then cosine to 0."""
    w = math.ceil(warmup * total)
    if step < w:
        return (step + 1) / w
    return 0.5 * (1 + math.cos(math.pi * (step - w) / max(1, total - w)))


def stop_if_not_finite(step, step_loss, grad_norm, proc: Proc, saved_to) -> None:
    """SystemExit naming the step, the loss, the gradient norm and the last good checkpoint when any
    rank's loss or gradient norm is not finite."""
    bad = (~torch.isfinite(step_loss) | ~torch.isfinite(grad_norm)).double()
    if proc.ddp:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    if bad.item():
        raise SystemExit(f"step {step + 1}: the loss is {step_loss.item():g} and the gradient norm "
                         f"{grad_norm.item():g} on rank {proc.rank}; stopped before updating the weights. The last "
                         f"good checkpoint is {saved_to or 'none (no step was saved)'}; check the data and --set "
                         "values (learning rates, loss weights) of this run")


# ---------------------------------------------------------------------------------------------
# The log: the objective's terms, throughput, MFU

class Meter:
    """What the log reports, summed on this rank between two log rows: the objective's terms (keys),
    the work done (samples, LLM tokens, frames, Q-Former tokens), the optimizer steps; and the
    samples skipped and micro-batches replaced since the run started."""

    def __init__(self, keys, model, proc: Proc, peak_tflops: float):
        self.keys, self.model, self.proc, self.peak_tflops = keys, model, proc, peak_tflops
        self.stats = torch.zeros(len(keys), dtype=torch.float64, device=proc.device)
        self.work = torch.zeros(4, dtype=torch.float64, device=proc.device)
        self.steps, self.skipped, self.replaced, self.since = 0, 0, 0, time.time()

    def add(self, terms, batch, k) -> None:
        """One micro-batch of an optimizer step of k: its terms (each / k) and its work."""
        self.stats += torch.stack([terms[t].detach().double() for t in self.keys]) / k
        self.work += batch_work(batch, self.model.cfg)

    def row(self, step, epoch, grad_norm, opt) -> dict:
        """One line of log.jsonl: means over the ranks and the steps since the last row of the terms
        and throughput, the gradient norm, learning rates, MFU on CUDA, the samples skipped and
        batches replaced since the run started (when any). Starts the next interval."""
        world, dt = self.proc.world, time.time() - self.since
        if self.proc.ddp:
            dist.all_reduce(self.stats)
            dist.all_reduce(self.work)
        means = self.stats / (self.steps * world)
        rec = {"step": step, "epoch": epoch, **{t: round(float(v), 5) for t, v in zip(self.keys, means)},
               "grad_norm": round(float(grad_norm), 4), "lr_lora": opt.param_groups[0]["lr"],
               "lr_other": opt.param_groups[1]["lr"], "samples_per_s": round(float(self.work[0]) / dt, 2),
               "tokens_per_s": round(float(self.work[1]) / dt, 1), "s_per_step": round(dt / self.steps, 4)}
        if self.proc.cuda:
            flops = train_flops(self.model, *self.work[1:].tolist())
            rec["mfu"] = round(flops / dt / (self.peak_tflops * 1e12 * world), 4)
        total_skipped, total_replaced = map(sum, zip(*gather((self.skipped, self.replaced), world)))
        if total_skipped:
            rec["skipped_samples"], rec["replaced_batches"] = total_skipped, total_replaced
        self.stats.zero_()
        self.work.zero_()
        self.steps, self.since = 0, time.time()
        return rec


def train_flops(model, llm_tokens, frames, qformer_tokens):
    """Model FLOPs of one forward + backward: 2 per weight per token forward, 2 more backward to
    the inputs, 2 more for the weight gradient of trained weights (frozen: 4 per weight, trained: 6);
    a frozen ViT runs forward only (2 per weight per patch), a trained one (train_base) 6. llm_tokens: LLM positions (video tokens
    included); frames; qformer_tokens: Q-Former positions (queries + instruction, per frame).
    Attention scores are left out."""
    def count(mod, trained):
        return sum(p.numel() for n, p in mod.named_parameters() if p.requires_grad == trained and "embed_tokens" not in n)
    cfg = model.cfg
    patches = (cfg.image_size // cfg.patch_size) ** 2 + 1
    llm = 4 * count(model.llm, False) + 6 * count(model.llm, True)
    heads = 6 * sum(p.numel() for m in (model.frm_head, model.evi_head) for p in m.parameters())
    qformer = (4 * count(model.qformer, False) + 6 * count(model.qformer, True)
               + 6 * sum(p.numel() for p in model.aggregator.parameters()))
    vit = 2 * count(model.vision, False) + 6 * count(model.vision, True)
    return (llm + heads) * llm_tokens + qformer * qformer_tokens + vit * patches * frames


def batch_work(batch, cfg):
    """(samples, LLM tokens (the video placeholder counted as its frames), frames, Q-Former tokens)
    of a collated batch, as a float64 tensor: what train_flops and the throughput figures count."""
    n_frames = batch["frame_mask"].sum(1)
    llm_tokens = batch["attention_mask"].sum() - batch["frame_mask"].any(1).sum() + n_frames.sum()
    qf_tokens = (n_frames * (cfg.num_query_tokens + batch["qformer_mask"].sum(1))).sum()
    return torch.stack([torch.tensor(len(batch["input_ids"]), device=n_frames.device), llm_tokens,
                        n_frames.sum(), qf_tokens]).double()


if __name__ == "__main__":
    cli.run(main)
