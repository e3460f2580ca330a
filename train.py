"""Training: `torchrun train.py --stage sft`, then `--stage fpo`. Paper: "Loss & Training", "Factorized
Preference Optimization"; DESIGN.md §5, §6, §8.

With no arguments the SFT stage trains the tiny preset on the synthetic event videos (generated
under data/synthetic on first use); on a 2-core CPU that takes a few minutes and the grounding loss
falls. `--stage fpo` then continues from the newest SFT checkpoint of the run on preference pairs
made from the same data (synth.py), or read from --pairs. Both stages share this loop; they differ
in the dataset (pairs are packed: prompt, chosen, rejected in one row) and the objective
(losses.sft_objective / fpo.objective). The real-size run on E.T.Instruct-164K, 4 GPUs:

    torchrun --nproc_per_node 4 train.py --stage sft --preset d2vlm-3.8b \\
        --vision-weights DIR --llm-weights DIR --data et_instruct_164k_txt.json --videos DIR
    torchrun --nproc_per_node 4 train.py --stage fpo --preset d2vlm-3.8b --vision-weights DIR --llm-weights DIR \
        --data et_instruct_164k_txt.json --videos DIR --set batch_size=8

DDP comes from torchrun's environment (gloo on CPU, NCCL on CUDA; multi-node through torchrun's own
flags). Checkpoints go to runs/<name>/<stage>/step_NNNNNN/ (written under a temporary name, then
renamed; the last --keep are kept) and hold: adapter/ (the LoRA adapter, a peft directory),
model.safetensors (the other trained tensors), config.json, tokenizer/ and trainer_state.pt (step,
data position, RNG states, optimizer; loadable with torch.load(weights_only=True)). --resume picks
up the newest one and continues exactly as if the run had not stopped. A JSONL log of every logged
step lands in runs/<name>/<stage>/log.jsonl.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

import data
import fpo
import losses
import model as modeling
import synth

SYNTHETIC = Path("data/synthetic")
STATE = "trainer_state.pt"


def get_args(argv=None):
    ap = argparse.ArgumentParser(description="Train D2VLM: SFT, then FPO.")
    ap.add_argument("--stage", choices=["sft", "fpo"], default="sft")
    ap.add_argument("--preset", choices=sorted(modeling.PRESETS), default="tiny")
    ap.add_argument("--set", nargs="+", action="extend", default=[], metavar="FIELD=VALUE",
                    help="override D2VLMConfig fields, e.g. --set w_cons=0 lr_lora=1e-4 batch_size=8")
    ap.add_argument("--data", help="annotation file (E.T.Instruct-164K txt/vid or the synthetic train.json); "
                                   "default: the synthetic set, generated on first use")
    ap.add_argument("--videos", help="folder the records' `video` paths are relative to")
    ap.add_argument("--vision-weights", help="local InstructBLIP checkpoint directory (vision + Q-Former)")
    ap.add_argument("--llm-weights", help="local Phi-3-mini-4k-instruct directory (model + tokenizer)")
    ap.add_argument("--init", help="fpo: the SFT checkpoint to start from (default: the newest in runs/<name>/sft)")
    ap.add_argument("--pairs", help="fpo: preference pairs from synth.py (default: made from --data, seeded)")
    ap.add_argument("--ref", choices=["none", "sft"], default="none",
                    help="fpo reference: none (as released) or the SFT model (log-probs computed once, before step 1)")
    ap.add_argument("--beta", type=float, help="fpo: the DPO temperature (default cfg.beta = 0.1)")
    ap.add_argument("--on-error", choices=["raise", "skip"], default="raise", help="bad records: stop or skip and count")
    ap.add_argument("--name", default="default", help="run name: checkpoints and log under runs/<name>/<stage>")
    ap.add_argument("--out", default="runs")
    ap.add_argument("--max-steps", type=int, help="optimizer steps in all (default: cfg.epochs epochs, FPO: cfg.fpo_epochs)")
    ap.add_argument("--stop-after", type=int, help="save and exit after this step, as if interrupted (--resume goes on)")
    ap.add_argument("--resume", nargs="?", const="latest", help="continue from the newest checkpoint of the run, or from DIR")
    ap.add_argument("--save-every", type=int, default=200, help="steps between checkpoints (and one at the end)")
    ap.add_argument("--keep", type=int, default=3, help="checkpoints to keep")
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--workers", type=int, help="data-loading processes per rank")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="accelerator peak for MFU (H100 bf16 dense)")
    return ap.parse_args(argv)


def configure(cfg, overrides):
    """cfg with FIELD=VALUE overrides, each parsed as its field's type."""
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    changes = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            raise SystemExit(f"--set {item}: expected FIELD=VALUE with FIELD one of D2VLMConfig's fields")
        kind = type(getattr(cfg, key))
        if kind is bool:
            if value.lower() not in ("true", "false", "1", "0"):
                raise SystemExit(f"--set {item}: {key} takes true or false")
            changes[key] = value.lower() in ("true", "1")
        elif kind in (int, float, str):
            try:
                changes[key] = kind(value)
            except ValueError:
                raise SystemExit(f"--set {item}: {key} must be of type {kind.__name__}") from None
        else:
            raise SystemExit(f"--set {item}: {key} cannot be set from the command line")
    return dataclasses.replace(cfg, **changes)


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


def train_flops(model, llm_tokens, frames, qformer_tokens):
    """Model FLOPs of one forward + backward: 2 per weight per token forward, 2 more backward to
    the inputs, 2 more for the weight gradient of trained weights (frozen: 4 per weight, trained: 6);
    a frozen ViT runs forward only (2 per weight per patch), a trained one (train_base) 6. llm_tokens: LLM positions (video tokens
    included); frames; qformer_tokens: Q-Former positions (queries + instruction, per frame).
    Attention scores are left out."""
    raw = model.module if isinstance(model, DDP) else model
    def count(mod, trained):
        return sum(p.numel() for n, p in mod.named_parameters() if p.requires_grad == trained and "embed_tokens" not in n)
    cfg = raw.cfg
    patches = (cfg.image_size // cfg.patch_size) ** 2 + 1
    llm = 4 * count(raw.llm, False) + 6 * count(raw.llm, True)
    heads = 6 * sum(p.numel() for m in (raw.frm_head, raw.evi_head) for p in m.parameters())
    qformer = (4 * count(raw.qformer, False) + 6 * count(raw.qformer, True)
               + 6 * sum(p.numel() for p in raw.aggregator.parameters()))
    vit = 2 * count(raw.vision, False) + 6 * count(raw.vision, True)
    return (llm + heads) * llm_tokens + qformer * qformer_tokens + vit * patches * frames


def batch_work(batch, cfg):
    """(samples, LLM tokens (the video placeholder counted as its frames), frames, Q-Former tokens)
    of a collated batch, as a float64 tensor: what train_flops and the throughput figures count."""
    n_frames = batch["frame_mask"].sum(1)
    llm_tokens = batch["attention_mask"].sum() - batch["frame_mask"].any(1).sum() + n_frames.sum()
    qf_tokens = (n_frames * (cfg.num_query_tokens + batch["qformer_mask"].sum(1))).sum()
    return torch.stack([torch.tensor(len(batch["input_ids"]), device=n_frames.device), llm_tokens,
                        n_frames.sum(), qf_tokens]).double()


def param_digest(model):
    """sha256 over the trained tensors, by name: equal digests = bit-identical trained weights."""
    h = hashlib.sha256()
    for n, p in sorted((n, p) for n, p in model.named_parameters() if p.requires_grad):
        h.update(n.encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def checkpoints(run_dir):
    return sorted(Path(run_dir).glob("step_[0-9]*"))


def save_checkpoint(run_dir, step, model, opt, state, full, keep):
    """runs/<name>/<stage>/step_NNNNNN, written as .step_NNNNNN.tmp and renamed; keeps the last `keep`."""
    final = Path(run_dir) / f"step_{step:06d}"
    tmp = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    modeling.save_weights(model, tmp, full)
    torch.save({**state, "step": step, "optimizer": opt.state_dict()}, tmp / STATE)
    if final.exists():  # a re-run of the same step: replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old)
    return final


@torch.no_grad()
def reference_logprobs(model, ds, collate, cfg, rank, world, device, autocast):
    """The log-prob factors of every pair under `model` (the SFT model FPO starts from), no dropout:
    (len(ds), 4) [chosen text, chosen grounding, rejected text, rejected grounding]. Each rank
    computes every world-th pair, then the ranks sum their tables."""
    was = model.training
    model.eval()
    table = torch.zeros(len(ds), 4, dtype=torch.float64, device=device)
    mine = list(range(rank, len(ds), world))
    for i in range(0, len(mine), cfg.batch_size):
        batch = {k: v.to(device) for k, v in collate([ds[j] for j in mine[i:i + cfg.batch_size]]).items()}
        with autocast:
            out = model(batch)
        c, r = fpo.policy_logprobs(out, batch, cfg.alpha)
        table[batch["index"]] = torch.stack([c["text"], c["grounding"], r["text"], r["grounding"]], 1).double()
    if world > 1:
        dist.all_reduce(table)
    model.train(was)
    return table


def gather(obj, world):
    """obj from every rank, in rank order."""
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def rng_state(device):
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def main(argv=None):
    args = get_args(argv)
    # ---- distributed setup from torchrun's environment
    ddp = "RANK" in os.environ
    cuda = torch.cuda.is_available()
    if ddp:
        dist.init_process_group("nccl" if cuda else "gloo")
        rank, world, local = dist.get_rank(), dist.get_world_size(), int(os.environ["LOCAL_RANK"])
    else:
        rank, world, local = 0, 1, 0
    device = torch.device(f"cuda:{local}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
    master = rank == 0
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()
    # ---- the starting point: the preset (sft) or the newest SFT checkpoint of the run (fpo)
    init = None
    if args.stage == "fpo":
        found = [Path(args.init)] if args.init else checkpoints(Path(args.out) / args.name / "sft")
        if not found or not (found[-1] / "config.json").is_file():
            raise SystemExit(f"fpo starts from an SFT checkpoint: none in {args.init or Path(args.out) / args.name / 'sft'} "
                             "(run `torchrun train.py --stage sft` first, or give --init DIR)")
        init = found[-1]
        base = modeling.D2VLMConfig.from_json((init / "config.json").read_text())
    else:
        base = modeling.PRESETS[args.preset]
    cfg = configure(base, args.set + ([f"beta={args.beta}"] if args.beta is not None else []))
    run_dir = Path(args.out) / args.name / args.stage
    if not args.resume and checkpoints(run_dir):  # never write over another run's checkpoints
        raise SystemExit(f"{run_dir} already holds checkpoints: add --resume to continue that run, or pick another --name")
    if master:
        run_dir.mkdir(parents=True, exist_ok=True)

    # ---- data
    if args.data is None:
        if master:
            data.ensure_synthetic(SYNTHETIC)
        if ddp:
            dist.barrier()
        args.data, args.videos = str(SYNTHETIC / "train.json"), args.videos or str(SYNTHETIC / "videos")
    if args.videos is None:
        raise SystemExit("--videos is required with --data (the folder the records' `video` paths are relative to)")

    # ---- model, optimizer, (resume)
    resume = None
    if args.resume:
        found = checkpoints(run_dir) if args.resume == "latest" else [Path(args.resume)]
        if not found or not (found[-1] / STATE).is_file():
            raise SystemExit(f"--resume: no checkpoint in {run_dir if args.resume == 'latest' else args.resume}")
        resume = found[-1]
        saved = modeling.D2VLMConfig.from_json((resume / "config.json").read_text())
        differ = [f"{k}={getattr(saved, k)!r} (now {v!r})" for k, v in dataclasses.asdict(cfg).items()
                  if getattr(saved, k) != (tuple(v) if isinstance(v, list) else v)]
        if differ:
            raise SystemExit(f"{resume}: was run with {', '.join(differ)}; resume with the same --preset and --set")
    torch.manual_seed(args.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    if init is not None:
        model = modeling.from_checkpoint(init, args.vision_weights, args.llm_weights, cfg=cfg).to(device)
    else:
        model = modeling.build_model(cfg, args.vision_weights, args.llm_weights,
                                     tokenizer_dir=resume / "tokenizer" if resume else None).to(device)
    full = args.vision_weights is None or args.llm_weights is None  # random frozen parts go into checkpoints
    torch.manual_seed(args.seed + rank)  # but other dropout masks on each rank
    opt = make_optimizer(model, cfg, fused=cuda, scale=cfg.fpo_lr_scale if args.stage == "fpo" else 1.0)
    records = args.data
    if args.stage == "fpo" and args.pairs:
        records = synth.load_pairs(args.pairs, cfg.fps)
    elif args.stage == "fpo":  # the same seed on every rank: the same pairs
        raw_records = data.load_records(args.data, args.on_error)
        records = synth.make_pairs([data.to_evidence(r, cfg.fps) for r in raw_records], args.seed)
        if master:
            synth.save_pairs(records, run_dir / "pairs.json")
            print(f"fpo: {len(records)} pairs from {len(raw_records)} records ("
                  + ", ".join(f"{k} {records.counts.get(k, 0)}" for k in synth.KINDS)
                  + f"), no kind applies to {records.unusable}; written to {run_dir / 'pairs.json'}", file=sys.stderr)
    ds = data.VideoDataset(records, args.videos, model.tokenizer, cfg, on_error=args.on_error)
    if len(ds) == 0:
        raise SystemExit(f"{args.data}: no usable records")
    sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
    micro_per_epoch = math.ceil(len(sampler) / cfg.batch_size)
    steps_per_epoch = math.ceil(micro_per_epoch / cfg.grad_accum)
    epochs = cfg.fpo_epochs if args.stage == "fpo" else cfg.epochs
    total = args.max_steps or max(1, math.ceil(epochs * steps_per_epoch))
    step, epoch, micro = 0, 0, 0
    if resume is not None:
        st = torch.load(resume / STATE, weights_only=True)
        for k, v in (("world_size", world), ("total", total), ("seed", args.seed), ("ref", args.ref)):
            if st[k] != v:
                raise SystemExit(f"{resume}: was run with {k}={st[k]}, this run has {v}; an exact resume needs the same")
        modeling.load_weights(model, resume)
        opt.load_state_dict(st["optimizer"])
        step, epoch, micro = st["step"], st["epoch"], st["micro"]
        torch.set_rng_state(st["rng"][rank]["cpu"])
        if cuda:
            torch.cuda.set_rng_state(st["rng"][rank]["cuda"], device)
    raw = model
    if ddp:
        model = DDP(model, device_ids=[local] if cuda else None)
    collate = partial(data.collate, tokenizer=raw.tokenizer, qformer_tokenizer=raw.qformer_tokenizer, cfg=cfg)
    keys = ("loss", "sft", "gnd", "cons")
    if args.stage == "sft":
        objective = partial(losses.sft_objective, cfg=cfg)
    else:
        ref = None
        if args.ref == "sft":  # the starting model's log-probs, computed once (and kept in the checkpoints)
            ref = (st["ref_logprobs"].to(device) if resume
                   else reference_logprobs(raw, ds, collate, cfg, rank, world, device, autocast))
        objective = partial(fpo.objective, cfg=cfg, ref=ref)
        keys += fpo.METRICS
    workers = args.workers if args.workers is not None else min(4, max(0, (os.cpu_count() or 1) // world - 1))

    def batches(epoch, micro):
        """Micro-batches from (epoch, micro) on; the sampler order is a function of (seed, epoch)."""
        while True:
            sampler.set_epoch(epoch)
            order = list(sampler)[micro * cfg.batch_size:]
            # own generator: creating the loader must not draw from the global RNG (exact resume)
            loader = DataLoader(ds, batch_size=cfg.batch_size, sampler=order, collate_fn=collate, num_workers=workers,
                                generator=torch.Generator(), pin_memory=cuda)
            for b in loader:
                yield b
            epoch, micro = epoch + 1, 0

    stream = batches(epoch, micro)
    if master:
        n_train = sum(p.numel() for p in raw.parameters() if p.requires_grad)
        print(f"{args.stage}: {len(ds)} samples ({ds.skipped['too_long']} too long, {ds.skipped['invalid']} invalid, "
              f"{ds.skipped['missing_video']} without video skipped), {world} process(es) x batch {cfg.batch_size} x "
              f"accumulation {cfg.grad_accum}, {total} steps, {n_train:,} trained parameters, device {device.type}",
              file=sys.stderr)
        log = open(run_dir / "log.jsonl", "a" if resume else "w")
    bar = tqdm(total=total, initial=step, disable=not master, desc=args.stage, dynamic_ncols=True,
               mininterval=0.5 if sys.stderr.isatty() else 30)
    t_start = t_log = time.time()
    first_step, n_acc, saved_to = step, 0, resume
    stats = torch.zeros(len(keys), dtype=torch.float64, device=device)  # the objective's terms
    work = torch.zeros(4, dtype=torch.float64, device=device)  # samples, LLM tokens, frames, Q-Former tokens
    model.train(args.stage == "sft")  # no dropout in FPO (as TRL's DPO): policy and reference see the same net
    while step < total:
        # ---- one optimizer step: up to grad_accum micro-batches, never across an epoch's end
        k = min(cfg.grad_accum, micro_per_epoch - micro)
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * lr_factor(step, total, cfg.warmup)
        for i in range(k):
            batch = {n: t.to(device, non_blocking=True) for n, t in next(stream).items()}
            sync = ddp and i < k - 1
            with model.no_sync() if sync else nullcontext(), autocast:
                out = model(batch)
                terms = objective(out, batch)
            (terms["loss"] / k).backward()
            stats += torch.stack([terms[t].detach().double() for t in keys]) / k
            work += batch_work(batch, cfg)
        grad_norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step, micro = step + 1, micro + k
        if micro == micro_per_epoch:
            epoch, micro = epoch + 1, 0
        n_acc += 1
        bar.update(1)
        stop = args.stop_after is not None and step >= args.stop_after

        # ---- log (the figures are means over the ranks and the steps since the last log)
        if step % args.log_every == 0 or step == total or stop:
            if ddp:
                dist.all_reduce(stats)
                dist.all_reduce(work)
            n, dt = n_acc, time.time() - t_log
            rec = {"step": step, "epoch": epoch, **{t: round(float(v) / (n * world), 5) for t, v in zip(keys, stats)},
                   "grad_norm": round(float(grad_norm), 4), "lr_lora": opt.param_groups[0]["lr"],
                   "lr_other": opt.param_groups[1]["lr"], "samples_per_s": round(float(work[0]) / dt, 2),
                   "tokens_per_s": round(float(work[1]) / dt, 1), "s_per_step": round(dt / n, 4)}
            if cuda:
                rec["mfu"] = round(train_flops(model, *work[1:].tolist()) / dt / (args.peak_tflops * 1e12 * world), 4)
            if master:
                log.write(json.dumps(rec) + "\n")
                log.flush()
                bar.set_postfix({t: rec[t] for t in ("loss", "gnd", "sft", "rewards/accuracies") if t in rec})
            last, n_acc, t_log = rec, 0, time.time()
            stats.zero_()
            work.zero_()

        # ---- checkpoint
        if step % args.save_every == 0 or step == total or stop:
            rng = gather(rng_state(device), world)
            if master:
                state = {"epoch": epoch, "micro": micro, "rng": rng, "world_size": world, "total": total,
                         "seed": args.seed, "ref": args.ref, "stage": args.stage}
                if args.stage == "fpo" and args.ref == "sft":
                    state["ref_logprobs"] = ref.cpu()
                saved_to = save_checkpoint(run_dir, step, raw, opt, state, full, args.keep)
            if ddp:
                dist.barrier()
        if stop:
            break
    bar.close()

    # ---- summary: every rank's trained weights must be bit-identical
    digests = gather(param_digest(raw), world)
    if master:
        wall = time.time() - t_start
        done = step - first_step
        summary = {"summary": True, "stage": args.stage, "steps": step, "wall_s": round(wall, 1),
                   "s_per_step": round(wall / max(done, 1), 4), "final": last if done else None,
                   "checkpoint": str(saved_to), "rank_digests": digests}
        log.write(json.dumps(summary) + "\n")
        log.close()
        fin = (f"loss {last['loss']:.4f} (sft {last['sft']:.4f}, gnd {last['gnd']:.4f}, cons {last['cons']:.4f}"
               + (f", fpo {last['fpo']:.4f}, reward accuracy {last['rewards/accuracies']:.3f}" if "fpo" in last else "")
               + ")" if done else "no steps run")
        print(f"{args.stage}: {done} steps to step {step}/{total} in {wall:.1f} s ({wall / max(done, 1):.3f} s/step), "
              f"{fin}; checkpoint {summary['checkpoint']}", file=sys.stderr)
    if ddp:
        dist.barrier()  # let every rank finish its part before the group goes away
        dist.destroy_process_group()
    if len(set(digests)) > 1:
        raise SystemExit("the ranks' trained weights differ: DDP went out of sync")


if __name__ == "__main__":
    main()
