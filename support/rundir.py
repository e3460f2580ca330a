"""A training run's directory, runs/<name>/<stage>: what train.py does before and after its loop.

    claim(run_dir, master, ddp)             one writer: rank 0 takes the lock, every rank stops alike
    refuse_used(run_dir)                    a fresh run never writes over another run's checkpoints
    settings(args)                          the run's --set (and --beta) settings
    starting_point(args, run_dir)           the config, the --init directory, the checkpoint --resume goes
                                            on from (checked against its manifest and config)
    starting_model(...), run_tokenizer(...) the model and tokenizer the run starts from
    resume_state(resume, **expected) / restore(...)   the trainer state read first, then loaded
    save(...)                               a checkpoint (checkpoint.save_checkpoint: atomic, the last --keep)
    cut_log(path, step) / summarize(...)    log.jsonl cut back on resume; its closing line
    param_digest(model), gather(obj, world) the ranks' trained weights compared at the end
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import checkpoint as ckpt
import model as modeling
from config import ADAPTER_SHAPE, PRESETS, configure
from support import released
from support.files import atomic_path


def claim(run_dir, master, ddp):
    """Rank 0 creates the run directory and takes its lock (checkpoint.lock_run); every rank stops
    with the same message when it cannot. Returns the lock (rank 0) or None."""
    lock, problem = None, None
    if master:
        run_dir.mkdir(parents=True, exist_ok=True)
        try:
            lock = ckpt.lock_run(run_dir)
        except SystemExit as e:
            problem = str(e.code)
    if ddp:
        box = [problem]
        dist.broadcast_object_list(box, 0)
        problem = box[0]
    if problem:
        raise SystemExit(problem)
    return lock


def refuse_used(run_dir) -> None:
    """A fresh run never writes over another run's checkpoints: SystemExit when run_dir holds some."""
    if ckpt.checkpoints(run_dir):
        raise SystemExit(f"{run_dir} already holds checkpoints: add --resume to continue that run, or pick another --name")


def settings(args) -> list:
    """The FIELD=VALUE settings of a run: --set, then --beta."""
    return args.set + ([f"beta={args.beta}"] if args.beta is not None else [])


def starting_point(args, run_dir):
    """(cfg, init, resume, passed): the config this run trains with (the preset; with a released --init the
    preset with the directory's widths; for FPO from our SFT checkpoint, its config; --set on top);
    the directory the model starts from (None: SFT from --vision-weights / --llm-weights, or random);
    the checkpoint --resume continues (None for a fresh run; the newest intact one, checked against
    its manifest), which must have run with the same config; the damaged ones passed over, with why."""
    init = None
    if args.init and released.is_released(args.init):
        init = Path(args.init)
        base = released.config_from(init, PRESETS[args.preset or "d2vlm-3.8b"])
    elif args.stage == "fpo":
        found = [Path(args.init)] if args.init else ckpt.checkpoints(Path(args.out) / args.name / "sft")
        if not found or not (found[-1] / ckpt.CONFIG).is_file():
            raise SystemExit(f"fpo starts from an SFT checkpoint: none in {args.init or Path(args.out) / args.name / 'sft'} "
                             "(run `torchrun train.py --stage sft` first, or give --init DIR)")
        init = found[-1]
        base = ckpt.read_config(init)
    elif args.init and args.stage == "pretrain":
        raise SystemExit(f"--init {args.init}: the pretrain stage starts from random weights (or --resume)")
    elif args.init and args.stage == "sft" and (Path(args.init) / ckpt.CONFIG).is_file():
        init = Path(args.init)
        base = PRESETS[args.preset or "tiny"]
    elif args.init:
        raise SystemExit(f"--init {args.init}: sft starts from a released directory (config.json of model_type "
                         f"{released.MODEL_TYPE}); to continue one of our runs use --resume")
    else:
        base = PRESETS[args.preset or "tiny"]
    cfg = configure(base, settings(args))
    if args.stage == "fpo" and cfg.fpo_start == "continue" and not released.is_released(init):
        changed = [f"{k}={getattr(base, k)!r} there, {getattr(cfg, k)!r} here" for k in ADAPTER_SHAPE
                   if getattr(cfg, k) != getattr(base, k)]
        if changed:
            raise SystemExit(f"{init}: fpo_start=continue trains this checkpoint's LoRA on ({'; '.join(changed)}); "
                             "keep its LoRA settings, or --set fpo_start=merged for a fresh LoRA")
    if args.stage == "fpo" and (cfg.response_format, cfg.evidence_level) != ("factorized", "event"):
        raise SystemExit(f"fpo: preference pairs are made for the factorized, event-level response; this run has "
                         f"response_format={cfg.response_format}, evidence_level={cfg.evidence_level} (the ablations "
                         "A1, A2 and B1 are SFT only, as in the paper)")
    if not args.resume:
        refuse_used(run_dir)
        return cfg, init, None, []
    found = ckpt.checkpoints(run_dir) if args.resume == "latest" else [Path(args.resume)]
    passed = []  # damaged checkpoints skipped on the way to the newest intact one
    for d in reversed(found):
        why = ckpt.damaged(d) if (d / ckpt.STATE).is_file() else f"no {ckpt.STATE}"
        if why is None:
            break
        passed.append((d, why))
    else:
        where = run_dir if args.resume == "latest" else args.resume
        raise SystemExit(f"--resume: no intact checkpoint in {where}"
                         + (f" ({passed[0][0].name}: {passed[0][1]})" if passed else ""))
    resume = d
    saved = ckpt.read_config(resume)
    differ = [f"{k}={getattr(saved, k)!r} (now {v!r})" for k, v in dataclasses.asdict(cfg).items()
              if getattr(saved, k) != (tuple(v) if isinstance(v, list) else v)]
    if differ:
        raise SystemExit(f"{resume}: was run with {', '.join(differ)}; resume with the same --preset and --set")
    return cfg, init, resume, passed


def run_tokenizer(args, cfg, init, resume):
    """The LLM tokenizer of the model starting_model will build (the data is checked with it first)."""
    if init is not None:
        return ckpt.tokenizer_of(init, args.vision_weights, args.llm_weights)
    return ckpt.llm_tokenizer(cfg, args.llm_weights, resume / ckpt.TOKENIZER if resume else None)


def _qformer_tokenizer(resume):
    """The Q-Former tokenizer a resumed run saved, if it has its own."""
    d = resume / ckpt.QFORMER_TOKENIZER if resume else None
    return d if d is not None and d.is_dir() else None


def starting_model(args, cfg, init, resume, tokenizer, master):
    """(model, own): the model the run starts from, a released --init, our checkpoint (SFT: its LoRA
    merged, a fresh one; FPO), or the weight directories / random weights (the tokenizer and
    Q-Former tokenizer of a resumed run: its own); own: whether its frozen weights are not those of
    --vision-weights / --llm-weights, so that its checkpoints must hold every tensor."""
    if init is not None and released.is_released(init):
        model, fresh = released.load(init, cfg, args.qformer_tokenizer, tokenizer)
        if master:
            print(f"{args.stage}: starting from {init} (released layout); fresh: {', '.join(fresh + ['LoRA'])}",
                  file=sys.stderr)
        return model, True
    if init is not None:
        model = ckpt.from_checkpoint(init, args.vision_weights, args.llm_weights, cfg=cfg, tokenizer=tokenizer)
        if args.stage == "sft":
            return modeling.merge_and_fresh_lora(model, cfg), True
        return model, ckpt.is_full(init)
    model = ckpt.from_weights(cfg, args.vision_weights, args.llm_weights, qformer_tokenizer_dir=_qformer_tokenizer(resume),
                              tokenizer=tokenizer)
    return model, args.vision_weights is None or args.llm_weights is None


def resume_state(resume, **expected):
    """The trainer state (step, epoch, micro, rng, optimizer, ...) of the checkpoint a run resumes,
    read before any weight is loaded: the run must match `expected` (world_size, total, seed, ref)
    for an exact resume. {} when `resume` is None."""
    if resume is None:
        return {}
    try:
        st = torch.load(resume / ckpt.STATE, weights_only=True)
    except Exception as e:  # a pickle of other objects, a truncated or foreign file: torch raises several kinds
        lines = [re.sub(r"\x1b\[[0-9;]*m", "", x).strip() for x in str(e).splitlines() if x.strip()] or [""]
        why = next((x for x in lines if x.startswith("WeightsUnpickler error:")), lines[0])  # names the object found
        raise ValueError(f"{resume / ckpt.STATE}: not a trainer state of plain tensors and values "
                         f"({type(e).__name__}: {why.split('. ')[0]})") from None
    need = ("step", "epoch", "micro", "rng", "optimizer", *expected)
    if not isinstance(st, dict) or any(k not in st for k in need):
        got = sorted(st) if isinstance(st, dict) else type(st).__name__
        raise ValueError(f"{resume / ckpt.STATE}: a trainer state holds {', '.join(need)}; this one: {got}")
    for k, v in expected.items():
        if st[k] != v:
            raise SystemExit(f"{resume}: was run with {k}={st[k]}, this run has {v}; an exact resume needs the same")
    return st


def restore(resume, st, model, opt, rank, device) -> None:
    """For an exact resume: the checkpoint's weights, its optimizer state and this rank's RNG state
    (st: resume_state's) into `model`, `opt` and the process."""
    ckpt.load_weights(model, resume)
    opt.load_state_dict(st["optimizer"])
    torch.set_rng_state(st["rng"][rank]["cpu"])
    if device.type == "cuda":
        torch.cuda.set_rng_state(st["rng"][rank]["cuda"], device)


def cut_log(path: Path, step: int) -> None:
    """Keep the rows of log.jsonl up to `step`: a resumed run logs the steps after it again. A line
    torn by a kill is dropped."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if row.get("steps", row.get("step", 0)) <= step:
            keep.append(line + "\n")
    with atomic_path(path) as tmp:
        tmp.write_text("".join(keep), encoding="utf-8")


def save(run_dir, raw, opt, state, full, keep, world, device, master, ddp):
    """A checkpoint of the run at state["step"] (state: the trainer state but the RNG and the optimizer):
    rank 0 writes it, with every rank's RNG state; the others wait. Returns its directory (rank 0) or None."""
    rng = gather(rng_state(device), world)
    saved = None
    if master:
        saved = ckpt.save_checkpoint(run_dir, state["step"], raw, {**state, "rng": rng, "optimizer": opt.state_dict()},
                                     full, keep)
    if ddp:
        dist.barrier()
    return saved


def rng_state(device):
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def param_digest(model):
    """sha256 over the trained tensors, by name: equal digests = bit-identical trained weights."""
    h = hashlib.sha256()
    for n, p in sorted((n, p) for n, p in model.named_parameters() if p.requires_grad):
        h.update(n.encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def gather(obj, world):
    """obj from every rank, in rank order."""
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def summarize(log, stage, step, total, done, wall, last, saved_to, digests):
    """The closing line of log.jsonl and of the run's output."""
    summary = {"summary": True, "stage": stage, "steps": step, "wall_s": round(wall, 1),
               "s_per_step": round(wall / max(done, 1), 4), "final": last if done else None,
               "checkpoint": str(saved_to), "rank_digests": digests}
    log.write(json.dumps(summary) + "\n")
    log.close()
    fin = (f"loss {last['loss']:.4f} (sft {last['sft']:.4f}, gnd {last['gnd']:.4f}, cons {last['cons']:.4f}"
           + (f", fpo {last['fpo']:.4f}, reward accuracy {last['rewards/accuracies']:.3f}" if "fpo" in last else "")
           + ")" if done else "no steps run")
    print(f"{stage}: {done} steps to step {step}/{total} in {wall:.1f} s ({wall / max(done, 1):.3f} s/step), "
          f"{fin}; checkpoint {saved_to}", file=sys.stderr)
