"""Training and generation steps: the <evi> overhead (a D2VLM SFT step against a plain video-LLM
step on the same tokens: the same video encoder, then Phi-3 with the same LoRA once over [text,
video tokens] with the token loss only), FPO step / SFT step, generation tokens/s, memory at real
size, and the real size's steps on a GPU.

    dvc_batches(m, frames, copies, device)    a 3-event sample as SFT batch, packed pair, rejected batch
    step_figures(preset, frames, repeat)      the <evi> overhead, FPO / SFT
    generation_figures(preset, frames, ...)   greedy tokens/s per batch size; prompt and per-token times
    memory_figures(preset)                    parameter, gradient and AdamW bytes, fp32 -> frozen in bf16
    realsize_figures(preset, ..., device)     SFT / FPO step, MFU, peak memory, projected E.T.Instruct hours
"""
from __future__ import annotations

import dataclasses
import math
import time

import numpy as np
import torch

import batches
import decoding
import evaluate
import fpo
import losses
import model
import synth
import train
from config import PRESETS
from evidence import EVI, EVI_END
from measure.decode import ETINSTRUCT, timed
from measure.targets import TARGETS


# ---------------------------------------------------------------------------------------------
# Training steps

E = EVI
# a question to generate answers to (prompts only)
QUESTION = {"prompt": "Find the moment when a red square appears.", "question_frames": [], "response": "", "frames": []}
DVC = {"task": "dvc", "prompt": "Densely describe all the events.", "question_spans": [], "question_frames": [],
       "response": E * 3 + EVI_END + f"{E} seconds, a red square appears.\n{E} seconds, a blue circle "
                   f"moves left.\n{E} seconds, a green triangle grows."}


def dvc_batches(m, frames, copies=1, device="cpu"):
    """A 3-event dense-captioning sample over `frames` random frames (spans spread over the clip),
    `copies` times in a batch: (SFT batch, packed preference pair with a shifted rejected response,
    the rejected response as an SFT batch)."""
    cfg = m.cfg
    spans = [[frames * a // 16, frames * b // 16] for a, b in ((1, 4), (6, 9), (11, 15))]
    ev = {**DVC, "duration": float(frames), "spans": spans, "frames": spans}
    rej = synth.perturb(ev, "shift", np.random.default_rng(0))
    clip = torch.randint(0, 255, (frames, 3, cfg.image_size, cfg.image_size), dtype=torch.uint8)

    def col(e):
        b = batches.collate([{"evidence": e, "frames": clip}] * copies, m.tokenizer, m.qformer_tokenizer, cfg)
        return {k: v.to(device) for k, v in b.items()}
    return (col(ev), col({**ev, "rejected": rej}),
            col({**ev, "response": rej["response"], "spans": rej["spans"], "frames": rej["spans"]}))


def plain_step_fn(m, b):
    """A plain video-LLM training step on the tokens of batch b: the same video encoder, then the
    LLM once over [text, video tokens] (no prefix/suffix split, no <evi> injection, no heads) with
    the token loss."""
    def step():
        m.zero_grad(set_to_none=True)
        video = m.encode_video(b["frames"], b["frame_mask"], b["qformer_ids"], b["qformer_mask"])
        emb = torch.cat([m.decoder.embed_tokens(b["input_ids"]), video.to(m.decoder.embed_tokens.weight.dtype)], 1)
        labels = torch.cat([b["labels"], torch.full(b["frame_mask"].shape, batches.IGNORE)], 1)
        m.llm(inputs_embeds=emb, labels=labels).loss.backward()
    return step


def step_figures(preset, frames, repeat):
    """<evi> overhead (D2VLM SFT step / plain video-LLM step, same tokens) and FPO step (packed
    pair) / SFT step, for one preset on CPU or the current device."""
    cfg = PRESETS[preset]
    torch.manual_seed(0)
    m = model.build_model(cfg)
    m.train()
    sft_b, pair_b, rej_b = dvc_batches(m, frames)
    n_tokens = int(train.batch_work(sft_b, cfg)[1])

    def sft_step():
        m.zero_grad(set_to_none=True)
        losses.sft_objective(m(sft_b), sft_b, cfg)["loss"].backward()

    def fpo_step():
        m.zero_grad(set_to_none=True)
        fpo.objective(m(pair_b), pair_b, cfg)["loss"].backward()

    def two_forwards():
        m.zero_grad(set_to_none=True)
        (losses.sft_objective(m(sft_b), sft_b, cfg)["loss"] + losses.sft_objective(m(rej_b), rej_b, cfg)["loss"]).backward()

    video = m.encode_video(sft_b["frames"], sft_b["frame_mask"], sft_b["qformer_ids"], sft_b["qformer_mask"]).detach()

    def llm_only(fn):
        """fn with the video tokens given: the LLM side alone (the encoder is not run)."""
        def run():
            m.encode_video = lambda *a: video
            try:
                fn()
            finally:
                del m.encode_video
        return run

    plain_step = plain_step_fn(m, sft_b)
    t_sft, t_plain, t_sft_llm, t_plain_llm, t_fpo, t_two = (
        timed(f, repeat) for f in (sft_step, plain_step, llm_only(sft_step), llm_only(plain_step), fpo_step, two_forwards))
    g = f"{preset}, {frames} frames, {n_tokens} LLM tokens"
    return [(g, "D2VLM SFT step", t_sft * 1e3, "ms", None),
            (g, "plain video-LLM step (same encoder, one LLM pass, token loss)", t_plain * 1e3, "ms", None),
            (g, "<evi> overhead: D2VLM / plain step", t_sft / t_plain, "x", TARGETS["evi_overhead"]),
            (g, "  LLM side only (video tokens given): D2VLM / plain", t_sft_llm / t_plain_llm, "x", TARGETS["evi_overhead"]),
            (g, "FPO step, chosen + rejected packed / SFT step", t_fpo / t_sft, "x", TARGETS["fpo_over_sft"]),
            (g, "  unpacked (two forwards) / SFT step", t_two / t_sft, "x", None)]


def generation_figures(preset, frames, batch_sizes=(1, 8, 32), new_tokens=32, device="cpu", targets=None):
    """Greedy generation tokens/s (new tokens, all samples) at several batch sizes, random weights, the
    model as evaluate.py runs it on `device` (model.for_inference), and at the middle batch size the
    time of a batch's prompt (the video encoded, pass 1: one new token) and of each new token after it.
    targets: {batch size: TARGETS key} for the tokens/s rows."""
    cfg = PRESETS[preset]
    torch.manual_seed(0)
    with torch.device(device):
        m = model.for_inference(model.build_model(cfg), device)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    g = f"generation, {preset}, {frames} frames, {torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}"
    rows, per, split = [], {}, {}
    for bs in batch_sizes:
        clips = [torch.randint(0, 255, (frames, 3, cfg.image_size, cfg.image_size), dtype=torch.uint8) for _ in range(bs)]
        b = evaluate.on_device(m, batches.collate([{"evidence": QUESTION, "frames": c} for c in clips], m.tokenizer,
                                                  m.qformer_tokenizer, cfg, with_response=False))

        def run(n):
            sync()
            t = time.perf_counter()
            with torch.no_grad(), evaluate.autocast(m):
                out = decoding.generate(m, b, n)
            sync()
            return time.perf_counter() - t, sum(len(o["tokens"]) for o in out)
        run(2)  # warm-up
        dt, n = run(new_tokens)
        per[bs] = n / dt
        rows.append((g, f"batch {bs}: greedy, {new_tokens} new tokens", per[bs], "tokens/s",
                     TARGETS[targets[bs]] if targets and bs in targets else None))
        if bs == batch_sizes[len(batch_sizes) // 2]:
            t_one, _ = run(1)
            split[bs] = (t_one, (dt - t_one) / (new_tokens - 1))
    rows.append((g, f"batch {batch_sizes[-1]} / batch {batch_sizes[0]}", per[batch_sizes[-1]] / per[batch_sizes[0]], "x", None))
    for bs, (t_prompt, t_token) in split.items():
        rows += [(g, f"batch {bs}: the prompt (video encoded, pass 1)", t_prompt * 1e3, "ms", None),
                 (g, f"batch {bs}: each new token after it", t_token * 1e3, "ms", None)]
    return rows, split


# ---------------------------------------------------------------------------------------------
# The real size: memory, GPU steps (CUDA)

def train_step(m, opt, objective, b, autocast):
    """One optimizer step as train.py takes it (autocast, backward, gradient clipping, AdamW); the loss."""
    with autocast:
        loss = objective(m(b), b, m.cfg)["loss"]
    loss.backward()
    torch.nn.utils.clip_grad_norm_(m.parameters(), m.cfg.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def memory_figures(preset="d2vlm-3.8b"):
    """Parameter, gradient and AdamW-state bytes of `preset` (built on the meta device) with every
    weight in fp32, then with the frozen ones held in bf16 as train.py does on CUDA (model.hold_frozen_in)."""
    with torch.device("meta"):
        m = model.build_model(PRESETS[preset])
    n_all = sum(p.numel() for p in m.parameters())
    trained = sum(p.numel() for p in m.parameters() if p.requires_grad)
    before = sum(p.numel() * p.element_size() for p in m.parameters())
    model.hold_frozen_in(m, torch.bfloat16)
    after = sum(p.numel() * p.element_size() for p in m.parameters())
    fp32 = torch.finfo(torch.float32).bits // 8
    grads, adam = fp32 * trained, 2 * fp32 * trained  # AdamW keeps two fp32 moments per trained weight
    g = f"memory at real size: {preset}, {n_all / 1e9:.2f} B parameters, {trained / 1e6:.0f} M trained"
    gib = 2 ** 30
    return [(g, "parameters, all fp32", before / gib, "GiB", None),
            (g, "parameters, frozen in bf16, trained in fp32", after / gib, "GiB", None),
            (g, "gradients (fp32, trained only)", grads / gib, "GiB", None),
            (g, "AdamW state (2 x fp32 per trained weight)", adam / gib, "GiB", None),
            (g, "parameters + gradients + AdamW: all fp32 -> frozen in bf16",
             (after + grads + adam) / gib, "GiB", None, (before + grads + adam) / gib)]


def realsize_figures(preset="d2vlm-3.8b", frames=None, steps=5, gpus=(1, 4, 8), device="cuda", batch=None):
    """SFT and FPO step of `preset` with random weights under bf16 autocast, as train.py runs it
    (AdamW over the trained tensors, gradient clipping): s/step, samples/s, tokens/s, peak memory,
    MFU from train.train_flops (ViT forward (+ backward if trained), Q-Former and aggregator,
    LLM forward + backward, heads; 2 FLOPs per weight per token forward, 4 backward for trained
    weights, 2 for frozen ones, attention scores left out), and the projected SFT + FPO time of one
    epoch each over E.T.Instruct-164K (one preference pair per sample) on N GPUs. batch: the
    micro-batch (default: the preset's)."""
    cfg = dataclasses.replace(PRESETS[preset], batch_size=batch or PRESETS[preset].batch_size)
    frames = frames or int(ETINSTRUCT["video_s"] * cfg.fps)
    cuda = device == "cuda"
    torch.manual_seed(0)
    with torch.device(device):  # the weights made where they run
        m = model.build_model(cfg)
    if cuda:
        model.hold_frozen_in(m, torch.bfloat16)  # as train.py
    m.train()
    opt = train.make_optimizer(m, cfg, fused=cuda)
    sft_b, pair_b, _ = dvc_batches(m, frames, cfg.batch_size, device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def step(objective, b):
        return lambda: train_step(m, opt, objective, b, autocast)

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t_sft = timed(step(losses.sft_objective, sft_b), steps, sync)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else math.nan
    t_fpo = timed(step(fpo.objective, pair_b), steps, sync)
    work = train.batch_work(sft_b, cfg).tolist()
    flops = train.train_flops(m, *work[1:])
    name = torch.cuda.get_device_name() if cuda else "CPU"
    peak_tflops = next((v for k, v in train.PEAK_TFLOPS.items() if k in name), math.nan)
    g = f"real size: {preset}, bf16, {frames} frames, batch {cfg.batch_size}, {name}"
    rows = [(g, "SFT step", t_sft, "s", None),
            (g, "samples/s", work[0] / t_sft, "samples/s", None),
            (g, "LLM tokens/s", work[1] / t_sft, "tokens/s", None),
            (g, "peak memory (SFT)", peak, "GiB", None),
            (g, f"MFU (SFT, {flops / 1e12:.1f} TFLOP per step, peak {peak_tflops:g} TFLOPS)",
             flops / t_sft / (peak_tflops * 1e12), "", TARGETS["mfu_batch1" if cfg.batch_size == 1 else "mfu_chosen"]),
            (g, "FPO step (packed pair)", t_fpo, "s", None)]
    for n in gpus:
        rows.append((g, f"E.T.Instruct-164K SFT + FPO on {n} GPU(s) (projected, ideal scaling)",
                     projected_hours(ETINSTRUCT["samples"], t_sft, t_fpo, work[0], n), "h",
                     TARGETS["etinstruct_hours"] if n == 4 else None))
    return rows


def projected_hours(samples: int, sft_step_s: float, fpo_step_s: float, batch: float, gpus: int) -> float:
    """Hours for one SFT epoch and one FPO epoch (one preference pair per sample) over `samples`,
    with steps of `batch` samples per GPU taking the measured times, on `gpus` GPUs scaling ideally."""
    return samples * (sft_step_s + fpo_step_s) / batch / gpus / 3600
