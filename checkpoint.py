"""Weight files: building D2VLM from local weight directories, our checkpoints, run directories.

    from_weights(cfg, vision_weights, llm_weights)   D2VLM with InstructBLIP's ViT + Q-Former and Phi-3 read
                                                     from local directories (random parts where none is given)
    save_weights / load_weights / from_checkpoint    our checkpoint directory (below); from_checkpoint and
                                                     read_config also take a released one (support/released.py)
    save_checkpoint(run_dir, step, ...)              runs/<name>/<stage>/step_NNNNNN, atomically, keeping the last few
    checkpoints(run_dir), latest_checkpoint(root)    finding them again; damaged(dir): checked against its manifest
    resolve(path, flag)                              what --init / --ckpt / --resume DIR names
    python checkpoint.py export --ckpt DIR --out DIR [--dtype bfloat16]   ours -> the released layout (released.export)
    lock_run(run_dir)                                one writer per run directory

A checkpoint directory holds adapter/ (the LoRA adapter, a peft directory), model.safetensors (the
other trained tensors; every non-LoRA tensor when "full": a model built without weight directories
has random frozen parts that must travel with it), config.json (D2VLMConfig), tokenizer/,
qformer_tokenizer/ when the Q-Former has its own and, in a training run, trainer_state.pt (step,
data position, RNG states, optimizer; torch.load with weights_only=True) and manifest.json (the
sha256 of every other file).
"""
from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import time
from pathlib import Path

import torch
from transformers import Phi3ForCausalLM

from config import ADAPTER_SHAPE, D2VLMConfig
from model import D2VLM, add_special_tokens, build_model, build_tiny_tokenizer
from support import cli, released
# WEIGHTS: the non-LoRA tensors; QFORMER_TOKENIZER: when the Q-Former's is not the LLM's
from support.files import (QFORMER_TOKENIZER, WEIGHTS, atomic_path, check_exactly, read_json, read_tensors,
                           read_tokenizer, safetensors_file, weight_map)
# MANIFEST: a checkpoint's sha256 of every other file; LOCK: marks a run folder; RESULTS: evaluate.py's folder in it
from support.outputs import LOCK, MANIFEST, RESULTS, check_folder

ADAPTER = "adapter"            # the LoRA adapter, a standard peft directory
CONFIG = "config.json"
TOKENIZER = "tokenizer"
STATE = "trainer_state.pt"     # a training run's state (support/rundir.py)
STEP = re.compile(r"step_(\d{6,})")  # a checkpoint directory's name in a run directory: step_NNNNNN
RUNS, DEFAULT_NAME = "runs", "default"  # train.py's --out and --name defaults: runs/<name>/<stage>/
DEFAULT_RUN = Path(RUNS) / DEFAULT_NAME


def llm_tokenizer(cfg: D2VLMConfig, llm_weights=None, tokenizer_dir=None):
    """The LLM tokenizer a model built by from_weights(cfg, llm_weights=..., tokenizer_dir=...) gets:
    llm_weights' (a Phi-3 directory), else the one saved in tokenizer_dir, else the in-code BPE;
    with <evi>, </evi>, <video> added. What the data is checked with before any weight is loaded."""
    for p in (llm_weights, tokenizer_dir):
        if p is not None and not Path(p).is_dir():
            raise FileNotFoundError(f"{p}: weights directory not found")
    source = llm_weights if llm_weights is not None else tokenizer_dir
    tok = (read_tokenizer(source, "Phi-3 tokenizer directory" if source == llm_weights else "checkpoint's tokenizer/")
           if source is not None else build_tiny_tokenizer(cfg.tiny_vocab))
    return add_special_tokens(tok)


def tokenizer_of(directory, vision_weights=None, llm_weights=None):
    """The LLM tokenizer of the model from_checkpoint(directory, vision_weights, llm_weights) loads
    (ours or a released directory), without reading any weight."""
    d = Path(directory)
    if released.is_released(d):
        return released.tokenizer_of(d)
    return llm_tokenizer(read_config(d), llm_weights, d / TOKENIZER)


def from_weights(cfg: D2VLMConfig, vision_weights=None, llm_weights=None, tokenizer_dir=None,
                 qformer_tokenizer_dir=None, tokenizer=None) -> D2VLM:
    """The D2VLM of `cfg`. vision_weights: a local InstructBLIP checkpoint directory (only its
    vision_model.*, qformer.* and query_tokens tensors are read, shard by shard; the language model
    in it is never loaded) with its qformer_tokenizer/. llm_weights: a local Phi-3 directory (model
    and tokenizer). Without them the weights are random and the tokenizers are the ones saved in
    tokenizer_dir / qformer_tokenizer_dir, else the in-code BPE for both (llm_tokenizer; `tokenizer`:
    the one it already gave). Nothing is fetched from the network."""
    for p in (vision_weights, llm_weights, tokenizer_dir, qformer_tokenizer_dir):
        if p is not None and not Path(p).is_dir():
            raise FileNotFoundError(f"{p}: weights directory not found")
    tok = tokenizer if tokenizer is not None else llm_tokenizer(cfg, llm_weights, tokenizer_dir)
    qtok = None
    if vision_weights is not None:
        qformer_tokenizer_dir = Path(vision_weights) / QFORMER_TOKENIZER
    if qformer_tokenizer_dir is not None:
        qtok = read_tokenizer(qformer_tokenizer_dir, "Q-Former tokenizer directory")
    llm = None
    if llm_weights is not None:
        if not (Path(llm_weights) / "config.json").is_file():
            raise FileNotFoundError(f"{llm_weights}: not a Phi-3 directory (no config.json)")
        llm = Phi3ForCausalLM.from_pretrained(llm_weights, local_files_only=True, dtype=torch.float32)
    model = build_model(cfg, tok, qtok, llm)
    if vision_weights is not None:
        load_instructblip(model, vision_weights)
    return model


def load_instructblip(model: D2VLM, directory) -> None:
    """Copy vision_model.*, qformer.*, query_tokens from the safetensors shards of an InstructBLIP
    checkpoint directory into `model`, reading only the shards that hold them."""
    d = Path(directory)
    index = d / "model.safetensors.index.json"
    if index.is_file():
        wmap = weight_map(index)
        shards = sorted({f for k, f in wmap.items() if k.startswith(("vision_model.", "qformer.", "query_tokens"))})
    elif (d / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{d}: no model.safetensors or model.safetensors.index.json")
    vis, qf, qt = {}, {}, None
    for shard in shards:
        with safetensors_file(d / shard) as f:
            for k in f.keys():
                if k.startswith("vision_model."):
                    vis[k[len("vision_model."):]] = f.get_tensor(k)
                elif k.startswith("qformer."):
                    qf[k[len("qformer."):]] = f.get_tensor(k)
                elif k == "query_tokens":
                    qt = f.get_tensor(k)
    if qt is None or not vis or not qf:
        raise ValueError(f"{d}: missing vision_model.*, qformer.* or query_tokens tensors")
    load_exactly(model.vision, vis, d, "vision_model.")
    load_exactly(model.qformer, qf, d, "qformer.")
    load_exactly(model, {"query_tokens": qt}, d, "", only=("query_tokens",))


def load_exactly(module, tensors: dict, source, prefix: str, only=None) -> None:
    """Copy `tensors` (names relative to `module`) into it. Every tensor must exist in the module
    with the same shape, and every one of the module's (or those in `only`) must be given; a
    mismatch is one error naming `source`, the tensor as the file names it (`prefix` + name) and
    both shapes. Values are cast to the module's dtype."""
    own = {k: v for k, v in module.state_dict().items() if only is None or k in only}
    check_exactly({k: tuple(v.shape) for k, v in own.items()}, {k: tuple(t.shape) for k, t in tensors.items()},
                  source, lambda k: prefix + k)
    with torch.no_grad():
        for k, t in tensors.items():
            own[k].copy_(t)


# ---------------------------------------------------------------------------------------------
# Our checkpoint directories

def save_weights(model: D2VLM, directory, full: bool) -> None:
    """Write model weights into `directory` (which must exist): the LoRA adapter as a peft
    directory, the other trainable tensors (all non-LoRA tensors when `full`) as safetensors, the
    config and the tokenizer."""
    from safetensors.torch import save_file
    d = Path(directory)
    model.llm.save_pretrained(d / ADAPTER, save_embedding_layers=False)
    tensors = {n: p.detach().contiguous() for n, p in model.named_parameters()
               if "lora_" not in n and (full or p.requires_grad)}
    save_file(tensors, str(d / WEIGHTS), metadata={"full": str(full)})
    (d / CONFIG).write_text(model.cfg.to_json())
    model.tokenizer.save_pretrained(d / TOKENIZER)
    if model.qformer_tokenizer is not model.tokenizer:
        model.qformer_tokenizer.save_pretrained(d / QFORMER_TOKENIZER)


def is_full(directory) -> bool:
    """Whether our checkpoint holds every non-LoRA tensor (else the trained ones: the rest is in the
    weight directories it was trained from)."""
    with safetensors_file(Path(directory) / WEIGHTS) as f:
        return (f.metadata() or {}).get("full") == "True"


def load_weights(model: D2VLM, directory) -> None:
    """Load what save_weights wrote into a model built with the same config (and the same weight
    directories when the checkpoint is not full). Every tensor in the files must match by name and shape."""
    from peft import set_peft_model_state_dict
    d = Path(directory)
    for f in (d / WEIGHTS, d / ADAPTER / "adapter_model.safetensors"):
        if not f.is_file():
            raise FileNotFoundError(f"{f}: checkpoint file not found")
    tensors = read_tensors(d / WEIGHTS)  # a subset of the model's tensors (the trained ones unless full)
    load_exactly(model, tensors, d / WEIGHTS, "", only=set(tensors))
    res = set_peft_model_state_dict(model.llm, read_tensors(d / ADAPTER / "adapter_model.safetensors"))
    if res.unexpected_keys:
        raise ValueError(f"{d / ADAPTER}: unexpected adapter tensors, e.g. {res.unexpected_keys[0]}")


def read_config(directory) -> D2VLMConfig:
    """The D2VLMConfig a checkpoint directory was saved with; for a released directory, the one its
    weights determine (released.config_from)."""
    d = Path(directory)
    if released.is_released(d):
        return released.config_from(d)
    if not (d / CONFIG).is_file():
        raise FileNotFoundError(f"{d}: not a checkpoint directory (no {CONFIG})")
    return D2VLMConfig.from_dict(read_json(d / CONFIG), d / CONFIG)


def from_checkpoint(directory, vision_weights=None, llm_weights=None, cfg: D2VLMConfig | None = None,
                    qformer_tokenizer=None, tokenizer=None) -> D2VLM:
    """The model saved in a checkpoint directory (config.json, tokenizer/, weights), or in a released
    directory (support/released.py: E.T.Chat, D2VLM, our exports; qformer_tokenizer is the Q-Former
    tokenizer directory when it holds none). A checkpoint that is not full also needs the weight
    directories the run was built from. `cfg` replaces the saved config (same architecture, other
    training settings: FPO after SFT; the LoRA as saved, ADAPTER_SHAPE). `tokenizer`: what
    tokenizer_of(directory, ...) gave."""
    d = Path(directory)
    if released.is_released(d):
        return released.load(d, cfg, qformer_tokenizer, tokenizer)[0]
    if not d.is_dir():
        raise FileNotFoundError(f"{d}: checkpoint directory not found")
    saved = read_config(d)
    if not is_full(d) and (vision_weights is None or llm_weights is None):
        raise ValueError(f"{d}: holds only the trained tensors; give the --vision-weights and --llm-weights it was trained from")
    qdir = d / QFORMER_TOKENIZER
    # the saved adapter loads at its own rank and targets (cfg's take over in merge_and_fresh_lora)
    built = saved if cfg is None else dataclasses.replace(cfg, **{k: getattr(saved, k) for k in ADAPTER_SHAPE})
    m = from_weights(built, vision_weights, llm_weights, tokenizer_dir=d / TOKENIZER,
                     qformer_tokenizer_dir=qdir if qdir.is_dir() and vision_weights is None else None, tokenizer=tokenizer)
    load_weights(m, d)
    return m


# ---------------------------------------------------------------------------------------------
# Run directories: runs/<name>/<stage>/step_NNNNNN

def checkpoints(run_dir) -> list:
    """The checkpoints a run wrote in a run directory, oldest first: folders named step_NNNNNN that
    hold a MANIFEST. Anything else there (a user's step_000002_backup, a folder without a manifest)
    is not a checkpoint: never counted, resumed from or removed."""
    d = Path(run_dir)
    found = [p for p in d.iterdir() if STEP.fullmatch(p.name) and (p / MANIFEST).is_file()] if d.is_dir() else []
    return sorted(found, key=step_of)


def step_of(directory) -> int:
    """The step of a checkpoint directory step_NNNNNN."""
    return int(STEP.fullmatch(Path(directory).name).group(1))


def strays(run_dir) -> list:
    """Folders of a run directory named like a checkpoint that the run did not write (no MANIFEST)."""
    d = Path(run_dir)
    found = [p for p in d.iterdir() if STEP.fullmatch(p.name)] if d.is_dir() else []
    return sorted(p for p in found if not (p / MANIFEST).is_file())


def results_dir(directory) -> Path:
    """Where evaluate.py writes the predictions and metrics of a checkpoint directory: beside it, in
    eval/<its name> of the folder holding it (runs/<name>/<stage>/eval/step_NNNNNN), never inside,
    where they would change what its manifest guards; kept when --keep removes the checkpoint."""
    d = Path(directory)
    return d.parent / RESULTS / d.name


def latest_checkpoint(root) -> tuple:
    """(the newest intact checkpoint of a run: FPO if it has any, else SFT; the damaged ones passed
    over on the way, [(dir, why)]). SystemExit saying why when there is none."""
    for stage in ("fpo", "sft"):
        if checkpoints(Path(root) / stage):
            found, passed = newest_intact(Path(root) / stage)
            if found is None:
                raise SystemExit(f"{Path(root) / stage}: no intact checkpoint ({passed[0][0].name}: {passed[0][1]}); "
                                 "give --ckpt DIR")
            return found, passed
    raise SystemExit(f"no checkpoint under {root}/fpo or {root}/sft: run `torchrun train.py --stage sft` first, or give --ckpt")


def save_checkpoint(run_dir, step: int, model: D2VLM, state: dict, full: bool, keep: int) -> Path:
    """runs/<name>/<stage>/step_NNNNNN (written under a temporary name, then renamed; a re-run of the
    same step replaces it) with the weights, `state` (trainer_state.pt) and MANIFEST (the sha256 of
    every file, written last); keeps the last `keep`. A failed write removes the temporary and
    raises one error naming the checkpoint; the earlier ones are untouched."""
    final = Path(run_dir) / f"step_{step:06d}"
    try:
        with atomic_path(final, replace_folder=(final / MANIFEST).is_file()) as tmp:  # a damaged one passed over
            tmp.mkdir(parents=True)
            save_weights(model, tmp, full)
            torch.save(state, tmp / STATE)
            (tmp / MANIFEST).write_text(json.dumps(_digests(tmp), indent=1))
    except Exception as e:  # disk full, quota, a dead mount: say where, keep nothing half-written
        raise OSError(f"{final}: saving the checkpoint failed ({e}); nothing was left there, the earlier "
                      "checkpoints are intact") from e
    for old in checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old)
    return final


def _digests(directory: Path) -> dict:
    """{relative path: sha256} of every file under `directory` but MANIFEST."""
    out = {}
    for f in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST):
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                h.update(block)
        out[str(f.relative_to(directory))] = h.hexdigest()
    return out


def newest_intact(run_dir) -> tuple:
    """(the newest checkpoint of `run_dir` its manifest vouches for, or None; the newer damaged ones
    passed over, [(dir, why damaged)], newest first)."""
    passed = []
    for d in reversed(checkpoints(run_dir)):
        why = damaged(d)
        if why is None:
            return d, passed
        passed.append((d, why))
    return None, passed


def resolve(path, flag: str) -> Path:
    """The checkpoint directory that `flag` (--init, --ckpt, --resume) names: a released directory as
    it is; one of our checkpoints, intact by its manifest; or a run folder's newest intact checkpoint
    (one line says which, and which damaged ones it passed over). SystemExit naming the flag and
    saying precisely why not otherwise."""
    d = Path(path)
    if not d.exists():
        raise SystemExit(f"{flag} {path}: not found")
    if not d.is_dir():
        raise SystemExit(f"{flag} {path}: a file; {flag} takes a checkpoint folder, a run folder or a released "
                         "directory")
    if released.is_released(d):
        return d
    if (d / CONFIG).is_file():
        why = damaged(d) if (d / MANIFEST).is_file() else None
        if why:
            raise SystemExit(f"{flag} {path}: a damaged checkpoint ({why}); restore it, or name another")
        return d
    if checkpoints(d):
        found, passed = newest_intact(d)
        if found is None:
            raise SystemExit(f"{flag} {path}: a run folder with no intact checkpoint ({passed[0][0].name}: "
                             f"{passed[0][1]})")
        skipped = "".join(f"; passed over {p.name} ({why})" for p, why in passed)
        print(f"{flag} {path}: its newest intact checkpoint, {found.name}{skipped}", file=sys.stderr)
        return found
    stages = [s for s in ("pretrain", "sft", "fpo") if checkpoints(d / s)]
    if stages:
        raise SystemExit(f"{flag} {path}: a run with the stages {', '.join(stages)}; name one, e.g. {d / stages[-1]}")
    raise SystemExit(f"{flag} {path}: neither a checkpoint (no {CONFIG}), a run folder (no step_NNNNNN checkpoint) "
                     f"nor a released directory ({CONFIG} of model_type {released.MODEL_TYPE})")


def damaged(directory) -> str | None:
    """Why a checkpoint directory cannot be trusted (a file missing, changed or added since it was
    written, by MANIFEST), or None when it is intact."""
    d = Path(directory)
    if not (d / MANIFEST).is_file():
        return f"no {MANIFEST}"
    try:
        want = read_json(d / MANIFEST)
    except (OSError, ValueError) as e:
        return f"{MANIFEST} unreadable ({e})"
    if not isinstance(want, dict):
        return f"{MANIFEST} is not a JSON object of file -> sha256"
    have = _digests(d)
    for f in sorted(set(want) | set(have)):
        if want.get(f) != have.get(f):
            why = "missing" if f not in have else "added since it was written" if f not in want else "changed since it was written"
            return f"{f} {why}"
    return None


def lock_run(run_dir):
    """Hold `run_dir`/LOCK (an exclusive flock: the system lets go of it when the process ends, even
    by kill -9) for as long as the returned file stays open. A second writer gets one error naming
    the holder."""
    f = open(Path(run_dir) / LOCK, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise SystemExit(f"{run_dir} is in use by {holder}: one run writes a run directory at a time "
                         "(wait for it, or pick another --name)") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
    f.flush()
    return f


# ---------------------------------------------------------------------------------------------
# python checkpoint.py export

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def main(argv=None):
    ap = cli.ArgumentParser(description="Export one of our checkpoints in the released D2VLM layout (support/released.py).")
    ap.add_argument("action", choices=["export"])
    ap.add_argument("--ckpt", required=True, help="our checkpoint directory (runs/<name>/<stage>/step_NNNNNN)")
    ap.add_argument("--out", required=True, help="the directory to write (must not exist)")
    ap.add_argument("--dtype", choices=list(DTYPES), default="bfloat16", help="tensor dtype (the release: bfloat16)")
    ap.add_argument("--vision-weights", help="as the run was trained from (checkpoints that hold only the trained tensors)")
    ap.add_argument("--llm-weights")
    args = ap.parse_args(argv)
    if Path(args.out).exists() or Path(args.out).is_symlink():
        raise SystemExit(f"--out {args.out}: already exists (export writes a new folder)")
    check_folder(args.out, "--out")
    model = from_checkpoint(resolve(args.ckpt, "--ckpt"), args.vision_weights, args.llm_weights)
    out = released.export(model, args.out, DTYPES[args.dtype])
    print(f"exported {args.ckpt} -> {out} ({args.dtype}, LoRA merged)", file=sys.stderr)


if __name__ == "__main__":
    cli.run(main)
