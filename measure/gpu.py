"""What the GPU speed depends on, and the GPU figures themselves: `python bench.py` prints the CPU
proxies on any machine, `python bench.py gpu` takes every GPU figure in one run.

    host_figures(preset, ...)    aten ops and host reads per SFT step, per FPO step and per generated
                                 token (counted under a dispatch mode on the CPU: on a GPU each op is
                                 at least one kernel launch, each host read a wait for the device)
    shape_figures(preset, ...)   the distinct LLM input shapes (prefix, suffix columns) over one epoch
                                 of the synthetic set, at each sequence multiple: each new shape is a
                                 new plan for some GPU kernels (cuDNN's attention above all)
    gpu_figures(...)             the tiny recipe's steps/s on real batches, the real size's SFT / FPO
                                 step, MFU and peak memory at micro-batch 1 and 4,
                                 generation tokens/s at batch 1 / 8 / 32, the projected hours
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import batches
import data
import decoding
import event_videos
import fpo
import losses
import model
import train
from config import PRESETS
from measure import REPO
from measure.decode import ETINSTRUCT
from measure.steps import QUESTION, dvc_batches, generation_figures, realsize_figures
from measure.targets import TARGETS

# ops whose result the host must read before it can go on (a value, or a size that depends on values)
HOST_READ_OPS = ("aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten._unique2",
                 "aten.unique_consecutive", "aten.unique_dim", "aten.repeat_interleave")
# ops that only make a new view of a tensor's memory: no kernel runs for them on a GPU
VIEW_OPS = ("aten.view", "aten._unsafe_view", "aten.t", "aten.transpose", "aten.permute", "aten.slice", "aten.select",
            "aten.expand", "aten.unsqueeze", "aten.squeeze", "aten.detach", "aten.alias", "aten.as_strided",
            "aten.unbind", "aten.split", "aten.split_with_sizes", "aten.chunk", "aten.unfold", "aten.diagonal")
# Tensor methods that copy a tensor to the host (on a CPU tensor they dispatch nothing, so they are counted here)
HOST_COPY_METHODS = ("tolist", "cpu", "numpy")
ETBENCH = {"questions": 7289, "answer_tokens": 64}  # E.T.Bench v1.0's questions; an answer's new tokens, assumed


class HostWork(TorchDispatchMode):
    """Counts the aten ops run inside it (`ops`, by name) and those that read a result back to the
    host (`reads`: HOST_READ_OPS, indexing by a boolean mask, and the Tensor methods HOST_COPY_METHODS)."""

    def __init__(self):
        super().__init__()
        self.ops, self.reads, self._saved = Counter(), Counter(), {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        self.ops[name] += 1
        masked = name in ("aten.index", "aten.index_put", "aten.index_put_") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else ()) or ())
        if name in HOST_READ_OPS or masked:
            self.reads[name + (" (bool mask)" if masked else "")] += 1
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        for name in HOST_COPY_METHODS:
            method = self._saved[name] = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, self._counting(name, method))
        return super().__enter__()

    def __exit__(self, *exc):
        for name, method in self._saved.items():
            setattr(torch.Tensor, name, method)
        return super().__exit__(*exc)

    def _counting(self, name, method):
        def call(t, *a, **k):
            self.reads[f"Tensor.{name}"] += 1
            return method(t, *a, **k)
        return call

    def totals(self) -> tuple:
        """(aten ops that run a kernel: VIEW_OPS left out, host reads)."""
        return sum(n for k, n in self.ops.items() if k not in VIEW_OPS), sum(self.reads.values())


def counted(fn) -> tuple:
    """(aten ops that run a kernel, host reads, casts: aten._to_copy) of one call of fn, after a warm-up call."""
    fn()
    with HostWork() as w:
        fn()
    return (*w.totals(), w.ops["aten._to_copy"])


def host_figures(preset="mid", frames=16, batch=8, new_tokens=(4, 12)):
    """Kernel-running aten ops and host reads per SFT step and FPO step (forward + backward, `batch`
    copies of steps.dvc_batches' 3-event sample over `frames` frames), the casts of an SFT step as CUDA runs
    it (frozen weights in bf16, bf16 autocast; CPU autocast's op lists are close to, not equal to,
    CUDA's), and ops and reads per generated token (greedy, `batch` prompts: the difference between
    generating new_tokens[1] and new_tokens[0] tokens, over the difference)."""
    cfg = PRESETS[preset]
    torch.manual_seed(0)
    m = model.build_model(cfg).train()
    sft_b, pair_b, _ = dvc_batches(m, frames, batch)

    def step(objective, b):
        def run():
            m.zero_grad(set_to_none=True)
            objective(m(b), b, cfg)["loss"].backward()
        return run

    g = f"host work, {preset}, batch {batch}, {frames} frames (CPU proxy: ops ~ kernel launches, reads ~ syncs)"
    rows = []
    for what, fn in (("SFT step", step(losses.sft_objective, sft_b)), ("FPO step (packed pair)", step(fpo.objective, pair_b))):
        ops, reads, _ = counted(fn)
        rows += [(g, f"{what}: aten ops", ops, "", None), (g, f"{what}: host reads", reads, "", None)]
    model.hold_frozen_in(m, torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rows.append((g, "SFT step as on CUDA (frozen weights in bf16, bf16 autocast): casts", counted(
            step(losses.sft_objective, sft_b))[2], "", None))
    torch.manual_seed(0)
    m = model.build_model(cfg).eval()
    clip = torch.randint(0, 255, (frames, 3, cfg.image_size, cfg.image_size), dtype=torch.uint8)
    prompts = batches.collate([{"evidence": QUESTION, "frames": clip}] * batch, m.tokenizer, m.qformer_tokenizer, cfg,
                              with_response=False)

    def per_token():
        per = []
        for n in new_tokens:
            out = []
            ops, reads, _ = counted(lambda: out.append(decoding.generate(m, prompts, n)))
            per.append((ops, reads, max(len(o["tokens"]) for o in out[-1])))
        (o0, r0, n0), (o1, r1, n1) = per
        if n1 == n0:
            raise RuntimeError(f"generation stopped at {n0} tokens both times: no per-token figure")
        return (o1 - o0) / (n1 - n0), (r1 - r0) / (n1 - n0)
    ops, reads = per_token()
    rows += [(g, "generation, per new token (the whole batch): aten ops", ops, "", None),
             (g, "generation, per new token (the whole batch): host reads", reads, "", None)]
    m.llm.merge_adapter()  # as model.for_inference runs it on CUDA
    return rows + [(g, "  the same, LoRA merged (as evaluate.py on CUDA): aten ops", per_token()[0], "", None)]


def llm_shapes(ds, batch_size: int, multiple: int, seed: int = 0) -> set:
    """The (prefix, suffix) column counts of the LLM input of each batch of one epoch over the
    dataset `ds` (batches.VideoDataset), in train.py's sample order for `seed` on one process, with
    the columns rounded up to `multiple` (model.layout's rule)."""
    vid = ds.tokenizer.convert_tokens_to_ids(data.VIDEO)
    order = list(torch.utils.data.DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=seed))
    pre, suf = [], []
    for ev, n_frames in zip(ds.items, ds.n_frames):
        p = batches.prompt_ids(ds.tokenizer, ds.cfg, [ev["prompt"]])[0]
        r = ds.tokenizer(batches.CHAT[1].format(response=ev["response"]), add_special_tokens=False)["input_ids"]
        v = p.index(vid)
        pre.append(v + n_frames)
        suf.append(len(p) - v - 1 + len(r))
    shapes = set()
    for i in range(0, len(order), batch_size):
        b = order[i:i + batch_size]
        shapes.add((model.round_up(max(pre[j] for j in b), multiple), model.round_up(max(suf[j] for j in b), multiple)))
    return shapes


def shape_figures(preset="tiny", multiples=(1, 64)):
    """The distinct (prefix, suffix) LLM shapes of one SFT epoch over the synthetic train split at
    `preset`'s batch size, at each sequence multiple."""
    train_json, _ = event_videos.ensure_synthetic(event_videos.SYNTHETIC)
    cfg = PRESETS[preset]
    tok = model.add_special_tokens(model.build_tiny_tokenizer(cfg.tiny_vocab))
    ds = batches.VideoDataset(train_json, train_json.parent / "videos", tok, cfg)
    g = f"LLM input shapes, one SFT epoch of the synthetic set ({len(ds)} samples, batch {cfg.batch_size})"
    return [(g, f"distinct (prefix, suffix) shapes, columns rounded up to a multiple of {k}",
             len(llm_shapes(ds, cfg.batch_size, k)), "", None) for k in multiples]


def tiny_recipe_steps(out_dir, steps: int, cpu_threads: int | None = None, log_every: int = 10, data_args=()) -> float:
    """Seconds per step of `steps` steps of the README's tiny SFT recipe (random start, the synthetic
    set's real batches, or train.py's `data_args`), the first log interval (warm-up) left out: on
    this process's device, or with cpu_threads on the CPU alone in a process of its own (no GPU
    visible, that many threads)."""
    name = f"tiny-{'cpu' if cpu_threads else 'device'}"
    args = ["--stage", "sft", "--init", "none", "--out", str(out_dir), "--name", name, "--max-steps", str(steps),
            "--log-every", str(log_every), "--save-every", str(steps), *data_args]
    shutil.rmtree(Path(out_dir) / name, ignore_errors=True)
    if cpu_threads:
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": str(cpu_threads)}
        subprocess.run([sys.executable, str(REPO / "train.py"), *args], env=env, check=True)
    else:
        train.main(args)
    rows = [json.loads(x) for x in (Path(out_dir) / name / "sft" / "log.jsonl").read_text().splitlines()]
    timed = [r["s_per_step"] for r in rows if "summary" not in r][1:]
    if not timed:
        raise RuntimeError(f"{steps} steps at a log every {log_every}: no interval after the warm-up one")
    return sum(timed) / len(timed)


def gpu_figures(out_dir="data/bench/gpu", device="cuda", preset="d2vlm-3.8b", micro_batches=(1, 4), frames=None,
                gen_batches=(1, 8, 32), new_tokens=32, tiny_steps=60, cpu_threads=2, log_every=10, data_args=()):
    """Every GPU figure of `bench.py gpu` in one run: the tiny recipe's s/step on the device and on
    `cpu_threads` CPU threads (the README's 2 cores), the real size's SFT / FPO step, MFU, peak
    memory and projected E.T.Instruct hours at each of micro_batches, generation tokens/s
    at each of gen_batches (frames: an E.T.Instruct video of mean length), and the projected hours
    of E.T.Bench (ETBENCH questions, each a prompt and ETBENCH["answer_tokens"] new tokens, at the
    middle batch size). On another device (a test's CPU run) the same code at whatever preset and
    sizes it is given."""
    frames = frames or int(ETINSTRUCT["video_s"] * PRESETS[preset].fps)
    t = tiny_recipe_steps(out_dir, tiny_steps, None, log_every, data_args)
    t_cpu = tiny_recipe_steps(out_dir, tiny_steps, cpu_threads, log_every, data_args)
    g = f"the tiny recipe (train.py --stage sft, synthetic set), {device} against {cpu_threads} CPU threads"
    rows = [(g, f"s/step on {device}", t, "s", None), (g, f"s/step on {cpu_threads} CPU threads", t_cpu, "s", None),
            (g, "steps/s: device / CPU", t_cpu / t, "x", TARGETS["tiny_gpu_over_cpu"])]
    for b in micro_batches:
        rows += realsize_figures(preset, frames, device=device, batch=b)
        if device == "cuda":
            torch.cuda.empty_cache()
    gen, split = generation_figures(preset, frames, gen_batches, new_tokens, device,
                                    targets={1: "tokens_s_batch1", 8: "tokens_s_batch8"})
    rows += gen
    for bs, (t_prompt, t_token) in split.items():
        hours = math.ceil(ETBENCH["questions"] / bs) * (t_prompt + ETBENCH["answer_tokens"] * t_token) / 3600
        rows.append((gen[0][0], f"E.T.Bench ({ETBENCH['questions']} questions, {ETBENCH['answer_tokens']} new tokens "
                                f"each) at batch {bs}, one GPU (projected)", hours, "h", TARGETS["etbench_hours"]))
    return rows
