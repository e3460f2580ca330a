"""A training run's directory, runs/<name>/<stage>: what train.py does before and after its loop.

    Proc                                    this process of the run: DDP or not, rank, world size, device
    claim(run_dir, proc)                    one writer: rank 0 takes the lock, every rank stops alike
    refuse_used(run_dir)                    a fresh run never writes over another run's checkpoints
    settings(args)                          the run's --set (and --beta) settings
    starting_point(args, run_dir, world)    the config, the --init directory, the checkpoint --resume goes
                                            on from (checked against its manifest, config, trainer state)
    starting_model(...), run_tokenizer(...) the model and tokenizer the run starts from
    resume_state(resume, **expected), check_state / restore(...)   the trainer state read and checked, then loaded
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


@dataclasses.dataclass(frozen=True)
class Proc:
    """This process of a training run, from torchrun's environment (train.setup_distributed)."""
    ddp: bool             # under torchrun (a process group), even with one process
    rank: int
    world: int            # processes in all
    local: int            # rank on this machine (its GPU)
    device: torch.device

    @property
    def master(self) -> bool:
        return self.rank == 0

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def claim(run_dir, proc: Proc):
    """Rank 0 creates the run directory and takes its lock (checkpoint.lock_run); every rank stops
    with the same message when it cannot. Returns the lock (rank 0) or None."""
    lock, problem = None, None
    if proc.master:
        run_dir.mkdir(parents=True, exist_ok=True)
        try:
            lock = ckpt.lock_run(run_dir)
        except SystemExit as e:
            problem = str(e.code)
    if proc.ddp:
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


def _base_config(init, preset, default):
    """The config a run starting from `init` builds on: a released directory's widths on the preset."""
    if init is not None and released.is_released(init):
        return released.config_from(init, PRESETS[preset or "d2vlm-3.8b"])
    return PRESETS[preset or default]


def starting_point(args, run_dir, world):
    """(cfg, init, resume, st): the config this run trains with; the directory the model starts from
    (None: SFT from --vision-weights / --llm-weights, or random; and every resumed run, which is built
    from its own config and checkpoint); the checkpoint --resume continues (None for a fresh run) and
    its trainer state, checked against this run (stage, processes, seed, reference) before any data
    or weight is read. A fresh run: the preset (with a released --init, the preset with the
    directory's widths; FPO from our SFT checkpoint, its config), --set on top."""
    if args.resume:
        return _resumed(args, run_dir, world)
    init = None
    if args.stage == "fpo":
        if args.init:
            init = ckpt.resolve(args.init, "--init")
        else:  # the run's own SFT stage: its newest intact checkpoint
            sft = Path(args.out) / args.name / "sft"
            init, passed = ckpt.newest_intact(sft)
            for d, why in passed:
                print(f"fpo: passed over {d} ({why})", file=sys.stderr)
            if init is None:
                raise SystemExit(f"fpo starts from an SFT checkpoint: {'no intact one' if passed else 'none'} in {sft} "
                                 "(run `torchrun train.py --stage sft` first, or give --init DIR)")
        base = ckpt.read_config(init) if not released.is_released(init) else _base_config(init, args.preset, None)
    elif args.init and args.stage == "pretrain":
        raise SystemExit(f"--init {args.init}: the pretrain stage starts from random weights")
    else:
        init = ckpt.resolve(args.init, "--init") if args.init else None
        base = _base_config(init, args.preset, "tiny")
    if args.qformer_tokenizer and (init is None or not released.is_released(init)):
        raise SystemExit("--qformer-tokenizer is for a released --init; "
                         + (f"{init} carries its own tokenizers" if init else "this run starts from none"))
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
    refuse_used(run_dir)
    refuse_strays(run_dir, 0)
    return cfg, init, None, {}


def _resumed(args, run_dir, world):
    """starting_point for --resume: the newest intact checkpoint of the run directory (the damaged ones
    passed over with a line each), or the one --resume DIR names; the run goes on with its config
    (a --preset or --set given must agree with it) and as the stage it is."""
    if args.resume == "latest":
        resume, passed = ckpt.newest_intact(run_dir)
        for d, why in passed:
            print(f"--resume: passed over {d} ({why})", file=sys.stderr)
        if resume is None:
            raise SystemExit(f"--resume: no intact checkpoint in {run_dir}"
                             + (f" ({passed[0][0].name}: {passed[0][1]})" if passed else ""))
    else:
        resume = ckpt.resolve(args.resume, "--resume")
        if released.is_released(resume):
            raise SystemExit(f"--resume {args.resume}: a released directory; --resume goes on with one of our "
                             "training runs (start from it with --init)")
    if args.qformer_tokenizer:
        raise SystemExit(f"--qformer-tokenizer with --resume: {resume} carries the run's own tokenizers")
    if not (resume / ckpt.STATE).is_file():
        raise SystemExit(f"--resume: {resume} holds no {ckpt.STATE}: a checkpoint, but not of a training run to go "
                         "on with")
    st = resume_state(resume, stage=args.stage, world_size=world, seed=args.seed, ref=args.ref)
    saved = ckpt.read_config(resume)
    cfg = configure(saved if args.preset is None else PRESETS[args.preset], settings(args))
    differ = [f"{k}={getattr(saved, k)!r} (now {v!r})" for k, v in dataclasses.asdict(cfg).items()
              if getattr(saved, k) != (tuple(v) if isinstance(v, list) else v)]
    if differ:
        raise SystemExit(f"{resume}: was run with {', '.join(differ)}; resume with the same --preset and --set, "
                         "or without them")
    if not ckpt.is_full(resume) and (args.vision_weights is None or args.llm_weights is None):
        raise SystemExit(f"{resume}: holds only the trained tensors; give the --vision-weights and --llm-weights "
                         "the run was started with")
    refuse_strays(run_dir, ckpt.step_of(resume))
    return cfg, None, resume, st


def refuse_strays(run_dir, step) -> None:
    """SystemExit when a folder named like a checkpoint the run will write (after `step`) is not one
    the run wrote (no manifest): saving there would replace a user's folder."""
    later = [d for d in ckpt.strays(run_dir) if ckpt.step_of(d) > step]
    if later:
        raise SystemExit(f"{later[0]}: named as this run's checkpoints are, but not one it wrote (no {ckpt.MANIFEST}); "
                         "the run would save there: move it, or pick another --name")


def run_tokenizer(args, cfg, init, resume):
    """The LLM tokenizer of the model starting_model will build (the data is checked with it first)."""
    if init is not None:
        return ckpt.tokenizer_of(init, args.vision_weights, args.llm_weights)
    return ckpt.llm_tokenizer(cfg, args.llm_weights, resume / ckpt.TOKENIZER if resume else None)


def starting_model(args, cfg, init, resume, tokenizer, master):
    """(model, own): the model the run starts from, a released --init, our checkpoint (SFT: its LoRA
    merged, a fresh one; FPO), or the weight directories / random weights; a resumed run: built from
    its config with the tokenizers it saved (restore() then loads its tensors). own: whether its
    frozen weights are not those of --vision-weights / --llm-weights, so that its checkpoints must
    hold every tensor."""
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
    qdir = resume / ckpt.QFORMER_TOKENIZER if resume else None
    model = ckpt.from_weights(cfg, args.vision_weights, args.llm_weights, tokenizer=tokenizer,
                              qformer_tokenizer_dir=qdir if qdir is not None and qdir.is_dir() else None)
    if resume:
        return model, ckpt.is_full(resume)
    return model, args.vision_weights is None or args.llm_weights is None


def resume_state(resume, **expected):
    """The trainer state (step, epoch, micro, rng, optimizer, ...) of the checkpoint a run resumes,
    read before any weight is loaded: it must hold `expected`'s keys with those values (stage,
    world_size, seed, ref; check_state: total, data_sha256) for an exact resume. {} when `resume` is None."""
    if resume is None:
        return {}
    try:
        st = torch.load(resume / ckpt.STATE, weights_only=True)
    except Exception as e:  # a pickle of other objects, a truncated or foreign file: torch raises several kinds
        lines = [re.sub(r"\x1b\[[0-9;]*m", "", x).strip() for x in str(e).splitlines() if x.strip()] or [""]
        why = next((x for x in lines if x.startswith("WeightsUnpickler error:")), lines[0])  # names the object found
        raise ValueError(f"{resume / ckpt.STATE}: not a trainer state of plain tensors and values "
                         f"({type(e).__name__}: {why.split('. ')[0]})") from None
    need = ("step", "epoch", "micro", "rng", "optimizer")
    if not isinstance(st, dict) or any(k not in st for k in need):
        got = sorted(st) if isinstance(st, dict) else type(st).__name__
        raise ValueError(f"{resume / ckpt.STATE}: a trainer state holds {', '.join(need)}; this one: {got}")
    check_state(st, resume, **expected)
    return st


def check_state(st, resume, **expected) -> None:
    """SystemExit naming the first of `expected` (key=value) that the trainer state `st` of `resume`
    does not hold as this run has it."""
    for k, v in expected.items():
        if k not in st:
            raise SystemExit(f"{resume}: its {ckpt.STATE} does not record {k} (a checkpoint of an older version?); an "
                             f"exact resume needs the same {k}")
        if st[k] != v:
            if k == "stage":
                raise SystemExit(f"{resume}: a checkpoint of the {st[k]} stage; --resume goes on with it "
                                 f"only as --stage {st[k]}")
            if k == "data_sha256":
                raise SystemExit(f"{resume}: was run on other data (--data, or --pairs, is not the file it read: its "
                                 "sha256 differs); an exact resume needs the same")
            raise SystemExit(f"{resume}: was run with {k}={st[k]}, this run has {v}; an exact resume needs the same")


def restore(resume, st, model, opt, proc: Proc) -> None:
    """For an exact resume: the checkpoint's weights, its optimizer state and this rank's RNG state
    (st: resume_state's) into `model`, `opt` and the process."""
    ckpt.load_weights(model, resume)
    opt.load_state_dict(st["optimizer"])
    torch.set_rng_state(st["rng"][proc.rank]["cpu"])
    if proc.cuda:
        torch.cuda.set_rng_state(st["rng"][proc.rank]["cuda"], proc.device)


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


def save(run_dir, model, opt, state, proc: Proc, *, full: bool, keep: int):
    """A checkpoint of the run at state["step"] (state: the trainer state but the RNG and the optimizer):
    rank 0 writes it, with every rank's RNG state; the others wait. full: every tensor, not only the
    trained ones; keep: the newest checkpoints kept. Returns its directory (rank 0) or None."""
    rng = gather(rng_state(proc.device), proc.world)
    saved = None
    if proc.master:
        saved = ckpt.save_checkpoint(run_dir, state["step"], model, {**state, "rng": rng, "optimizer": opt.state_dict()},
                                     full, keep)
    if proc.ddp:
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


def summarize(log, stage, *, step, total, done, wall, last, saved_to, digests):
    """The closing line of log.jsonl (log, closed) and of the run's output: the stage's steps to `step`
    of `total`, `done` of them in this process's `wall` seconds, the `last` log row, the checkpoint
    saved_to and the ranks' digests."""
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
