"""Speed, memory and learnability figures (not tests). Each ratio is measured within one run, on
this machine, between things that do the same work.

    python bench.py [--json FILE]         one table: frame sampling, the <evi> overhead of a training
                                          step, FPO step / SFT step, generation tokens/s at batch
                                          1 / 8 / 32, and (CUDA only) the real-size model
    python bench.py learn [--json FILE]   the embedded default end to end: SFT -> evaluate -> FPO ->
                                          evaluate on the synthetic test split, per-task metrics and
                                          the wall time of each stage
    python bench.py realwidth [--layers 2 --frames 8]   the real widths with few layers on the CPU
                                          (bf16): SFT step, FPO step, save, reload, generation

The `<evi>` overhead compares a D2VLM SFT step (video encoder, prefix pass, <evi> injection, suffix
pass, heads, the three losses) with a plain video-LLM step on the same tokens: the same video encoder,
then Phi-3 (same LoRA) once over [text, video tokens] with the token loss only.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import av
import numpy as np
import torch

import checkpoint
import data
import decoding
import etbench
import fpo
import losses
import model
import synth
import train
import video
from config import PRESETS
from evidence import EVI, EVI_END
from files import atomic_path

# E.T.Instruct-164K: samples, mean video length, LLM tokens of a sample (video tokens included, DESIGN
# §8), and the videos as the dataset ships them (3 fps, 224-px short side; 16:9 assumed)
ETINSTRUCT = {"samples": 164_000, "video_s": 146.0, "llm_tokens": 300, "fps": 3, "width": 398, "height": 224}
QFORMER_TEXT = 64   # BERT tokens of a question, about (a small share of the Q-Former's work)
LOADER = {"mfu": 0.5, "ahead": 2.0}  # the GPU's assumed MFU; how far ahead of it the loader must be
TARGETS = {"evi_overhead": ("<=", 1.15), "fpo_over_sft": ("<=", 1.6), "etinstruct_hours": ("<=", 6.0),
           "learn_s": ("<=", 600.0), "tvg_f1": (">=", 80.0), "dvc_f1": (">=", 60.0), "fpo_gnd_change": (">=", -1.0)}


def _time(fn, repeat, sync=lambda: None):
    """Mean seconds of fn() over `repeat` calls after one warm-up call."""
    fn()
    sync()
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync()
    return (time.perf_counter() - t) / repeat


# ---------------------------------------------------------------------------------------------
# Frame sampling

def sample_frames_seek(path, fps: float = 1.0, size: int = 224) -> torch.Tensor:
    """The usual alternative to video.sample_frames: one seek per sampled time k/fps (to the keyframe
    before it), then decode forward to the frame nearest to k/fps. The same frames, other cost."""
    out = []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        t0 = float((stream.start_time or 0) * stream.time_base)
        k = 0
        while True:
            target = k / fps
            container.seek(int((target + t0) / stream.time_base), stream=stream)
            prev, prev_t, pick = None, 0.0, None
            for frame in container.decode(stream):
                if frame.pts is None:
                    continue
                t = frame.time - t0
                if t >= target:
                    pick = prev if prev is not None and target - prev_t <= t - target else frame
                    break
                prev, prev_t = frame, t
            if pick is None:  # past the last frame
                break
            out.append(video.resize_crop(pick, size))
            k += 1
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


def sample_frames_decord(path, fps: float = 1.0, size: int = 224) -> torch.Tensor:
    """decord's reader (resizing inside the decoder), the frame nearest to each k/fps, centre crop."""
    import decord
    probe = decord.VideoReader(str(path))
    h, w = probe[0].shape[:2]
    scale = size / min(w, h)
    vr = decord.VideoReader(str(path), width=max(size, round(w * scale)), height=max(size, round(h * scale)))
    times = vr.get_frame_timestamp(range(len(vr)))[:, 0]
    idx = [int(np.argmin(np.abs(times - k / fps))) for k in range(int(times[-1] * fps + 1e-9) + 1)]
    img = vr.get_batch(idx).asnumpy()
    top, left = (img.shape[1] - size) // 2, (img.shape[2] - size) // 2
    return torch.from_numpy(img[:, top:top + size, left:left + size]).permute(0, 3, 1, 2).contiguous()


def make_clip(path, seconds: int, width: int, height: int, fps: int) -> Path:
    """A moving-pattern test clip (x264, the encoder's default keyframe interval), written once."""
    path = Path(path)
    if not path.is_file():
        yy, xx = np.mgrid[0:height, 0:width]
        def frames():
            for i in range(seconds * fps):
                img = np.empty((height, width, 3), np.uint8)
                img[..., 0] = (xx + 3 * i) % 256
                img[..., 1] = (yy + 2 * i) % 256
                img[..., 2] = ((xx + yy) // 4 + i) % 256
                yield img
        path.parent.mkdir(parents=True, exist_ok=True)
        video.write_video(path, frames(), fps)
    return path


def decode_figures(clip_dir, size=224, repeat=2):
    """Frames/s of the sequential sampler (ours), seek-per-sample and decord on the same clips."""
    clips = {"short clip (20 s, 320x240, 25 fps)": make_clip(Path(clip_dir) / "short.mp4", 20, 320, 240, 25),
             "long clip (120 s, 640x360, 30 fps)": make_clip(Path(clip_dir) / "long.mp4", 120, 640, 360, 30)}
    try:
        import decord  # noqa: F401
        readers = {"decord": sample_frames_decord}
    except ImportError:
        readers = {}
    rows = []
    for name, clip in clips.items():
        ref = video.sample_frames(clip, 1.0, size)
        t_seq = _time(lambda: video.sample_frames(clip, 1.0, size), repeat)
        rows.append(("frame sampling", f"{name}: PyAV sequential (ours)", len(ref) / t_seq, "frames/s", None))
        same = torch.equal(sample_frames_seek(clip, 1.0, size), ref)
        t_seek = _time(lambda: sample_frames_seek(clip, 1.0, size), repeat)
        rows.append(("frame sampling", f"{name}: PyAV seek per sample ({'same' if same else 'OTHER'} frames)",
                     len(ref) / t_seek, "frames/s", None))
        rows.append(("frame sampling", f"{name}: sequential / seek", t_seek / t_seq, "x", None))
        for rname, fn in readers.items():
            t = _time(lambda: fn(clip, 1.0, size), repeat)
            rows.append(("frame sampling", f"{name}: {rname}", len(ref) / t, "frames/s", None))
            rows.append(("frame sampling", f"{name}: sequential / {rname}", t / t_seq, "x", None))
    if not readers:
        rows.append(("frame sampling", "decord: not installed (pip install decord to compare)", math.nan, "", None))
    return rows


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


def loader_figures(clip_dir, preset="d2vlm-3.8b", gpu="H100", repeat=2):
    """Will the data loader keep up at real size? Decode + sample one E.T.Instruct-like clip on one
    worker (this process), against the projected training step per sample of one GPU at
    LOADER["mfu"] (train.train_flops of `preset`, built on the meta device); the DataLoader workers
    per GPU that keep the loader LOADER["ahead"] times ahead of it."""
    cfg = PRESETS[preset]
    e = ETINSTRUCT
    clip = make_clip(Path(clip_dir) / "etinstruct_like.mp4", int(e["video_s"]), e["width"], e["height"], e["fps"])
    t_decode = _time(lambda: video.sample_frames(clip, cfg.fps, cfg.image_size), repeat)
    with torch.device("meta"):
        m = model.build_model(cfg)
    frames = int(e["video_s"] * cfg.fps)
    flops = train.train_flops(m, e["llm_tokens"], frames, frames * (cfg.num_query_tokens + QFORMER_TEXT))
    t_step = flops / (LOADER["mfu"] * train.PEAK_TFLOPS[gpu] * 1e12)
    g = (f"data loading at real size: {int(e['video_s'])}-s clip, {e['fps']} fps, {e['width']}x{e['height']} "
         f"-> {frames} frames of {cfg.image_size} px")
    return [(g, "decode + sample one clip, one worker", t_decode, "s", None),
            (g, f"projected training step per sample, one {gpu} at {LOADER['mfu']:.0%} MFU "
                f"({flops / 1e12:.0f} TFLOP)", t_step, "s", None),
            (g, f"DataLoader workers per GPU to stay {LOADER['ahead']:g}x ahead",
             math.ceil(LOADER["ahead"] * t_decode / t_step), "workers", None)]


# ---------------------------------------------------------------------------------------------
# Training steps

E = EVI
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
        b = data.collate([{"evidence": e, "frames": clip}] * copies, m.tokenizer, m.qformer_tokenizer, cfg)
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
        labels = torch.cat([b["labels"], torch.full(b["frame_mask"].shape, data.IGNORE)], 1)
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
        _time(f, repeat) for f in (sft_step, plain_step, llm_only(sft_step), llm_only(plain_step), fpo_step, two_forwards))
    g = f"{preset}, {frames} frames, {n_tokens} LLM tokens"
    return [(g, "D2VLM SFT step", t_sft * 1e3, "ms", None),
            (g, "plain video-LLM step (same encoder, one LLM pass, token loss)", t_plain * 1e3, "ms", None),
            (g, "<evi> overhead: D2VLM / plain step", t_sft / t_plain, "x", TARGETS["evi_overhead"]),
            (g, "  LLM side only (video tokens given): D2VLM / plain", t_sft_llm / t_plain_llm, "x", TARGETS["evi_overhead"]),
            (g, "FPO step, chosen + rejected packed / SFT step", t_fpo / t_sft, "x", TARGETS["fpo_over_sft"]),
            (g, "  unpacked (two forwards) / SFT step", t_two / t_sft, "x", None)]


def generation_figures(preset, frames, batch_sizes=(1, 8, 32), new_tokens=32):
    """Greedy generation tokens/s (new tokens, all samples) at several batch sizes, random weights."""
    cfg = PRESETS[preset]
    torch.manual_seed(0)
    m = model.build_model(cfg).eval()
    ev = {"prompt": "Find the moment when a red square appears.", "question_frames": [], "response": "", "frames": []}
    rows, per = [], {}
    for bs in batch_sizes:
        clips = [torch.randint(0, 255, (frames, 3, cfg.image_size, cfg.image_size), dtype=torch.uint8) for _ in range(bs)]
        b = data.collate([{"evidence": ev, "frames": c} for c in clips], m.tokenizer, m.qformer_tokenizer, cfg,
                         with_response=False)
        with torch.no_grad():
            decoding.generate(m, b, 2)  # warm-up
            t = time.perf_counter()
            out = decoding.generate(m, b, new_tokens)
            dt = time.perf_counter() - t
        per[bs] = sum(len(o["tokens"]) for o in out) / dt
        rows.append((f"generation, {preset}, {frames} frames", f"batch {bs}: greedy, {new_tokens} new tokens",
                     per[bs], "tokens/s", None))
    rows.append((f"generation, {preset}, {frames} frames", f"batch {batch_sizes[-1]} / batch {batch_sizes[0]}",
                 per[batch_sizes[-1]] / per[batch_sizes[0]], "x", None))
    return rows


# ---------------------------------------------------------------------------------------------
# The real-size model (CUDA)

def realsize_figures(preset="d2vlm-3.8b", frames=None, steps=5, gpus=(1, 4, 8), device="cuda"):
    """SFT and FPO step of `preset` with random weights under bf16 autocast, as train.py runs it
    (AdamW over the trained tensors, gradient clipping): s/step, samples/s, tokens/s, peak memory,
    MFU from train.train_flops (ViT forward (+ backward if trained), Q-Former and aggregator,
    LLM forward + backward, heads; 2 FLOPs per weight per token forward, 4 backward for trained
    weights, 2 for frozen ones, attention scores left out), and the projected SFT + FPO time of one
    epoch each over E.T.Instruct-164K (one preference pair per sample) on N GPUs."""
    cfg = PRESETS[preset]
    frames = frames or int(ETINSTRUCT["video_s"] * cfg.fps)
    cuda = device == "cuda"
    torch.manual_seed(0)
    m = model.build_model(cfg).to(device)
    if cuda:
        model.hold_frozen_in(m, torch.bfloat16)  # as train.py
    m.train()
    opt = train.make_optimizer(m, cfg, fused=cuda)
    sft_b, pair_b, _ = dvc_batches(m, frames, cfg.batch_size, device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def step(objective, b):
        def run():
            with autocast:
                loss = objective(m(b), b, cfg)["loss"]
            loss.backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return run

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t_sft = _time(step(losses.sft_objective, sft_b), steps, sync)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else math.nan
    t_fpo = _time(step(fpo.objective, pair_b), steps, sync)
    work = train.batch_work(sft_b, cfg).tolist()
    flops = train.train_flops(m, *work[1:])
    name = torch.cuda.get_device_name() if cuda else "CPU"
    peak_tflops = next((v for k, v in train.PEAK_TFLOPS.items() if k in name), math.nan)
    g = f"real size: {preset}, bf16, {frames} frames, {name}"
    rows = [(g, "SFT step", t_sft, "s", None),
            (g, "samples/s", work[0] / t_sft, "samples/s", None),
            (g, "LLM tokens/s", work[1] / t_sft, "tokens/s", None),
            (g, "peak memory (SFT)", peak, "GiB", None),
            (g, f"MFU (SFT, {flops / 1e12:.1f} TFLOP per step, peak {peak_tflops:g} TFLOPS)",
             flops / t_sft / (peak_tflops * 1e12), "", None),
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


def realwidth_figures(layers: int = 2, frames: int = 8, new_tokens: int = 8, out_dir="data/bench/realwidth"):
    """The real widths (`d2vlm-3.8b`) with `layers` layers in each of ViT, Q-Former and LLM, random
    weights, on the CPU as train.py runs a GPU: frozen weights held in bf16, bf16 autocast. One SFT
    step, one FPO step (packed pair), save, checkpoint.from_checkpoint (the trained weights must
    come back bit for bit), greedy generation. Seconds for each, and generated tokens/s."""
    base = PRESETS["d2vlm-3.8b"]
    cfg = dataclasses.replace(base, vision_layers=layers, qformer_layers=layers, llm_layers=layers,
                              inject_layer=min(base.inject_layer, layers))
    torch.manual_seed(0)
    m = model.hold_frozen_in(model.build_model(cfg), torch.bfloat16).train()
    opt = train.make_optimizer(m, cfg)
    sft_b, pair_b, _ = dvc_batches(m, frames)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    times = {}
    for name, objective, b in (("SFT step", losses.sft_objective, sft_b), ("FPO step (packed pair)", fpo.objective, pair_b)):
        t = time.perf_counter()
        with autocast:
            loss = objective(m(b), b, cfg)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times[name] = time.perf_counter() - t
        if not torch.isfinite(loss):
            raise RuntimeError(f"realwidth: the {name} loss is {loss.item()}")
    out = Path(out_dir)
    with atomic_path(out) as tmp:
        t = time.perf_counter()
        tmp.mkdir(parents=True)
        checkpoint.save_weights(m, tmp, full=True)
        times["save (every tensor)"] = time.perf_counter() - t
    t = time.perf_counter()
    back = checkpoint.from_checkpoint(out).eval()
    times["checkpoint.from_checkpoint"] = time.perf_counter() - t
    same = train.param_digest(back) == train.param_digest(m)
    ev = {"prompt": "When does the red square appear?", "question_frames": [], "response": "", "frames": []}
    prompt = data.collate([{"evidence": ev, "frames": torch.randint(0, 255, (frames, 3, cfg.image_size, cfg.image_size),
                                                                    dtype=torch.uint8)}],
                          back.tokenizer, back.qformer_tokenizer, cfg, with_response=False)
    t = time.perf_counter()
    with torch.no_grad(), autocast:
        gen = decoding.generate(back, prompt, new_tokens)
    dt = time.perf_counter() - t
    g = f"real widths on the CPU: {layers} layer(s) each, bf16 autocast, frozen weights in bf16, {frames} frames"
    rows = [(g, k, v, "s", None) for k, v in times.items()]
    rows.append((g, "trained weights after from_checkpoint: bit-identical (1 = yes)", float(same), "", None))
    rows.append((g, f"greedy generation, {new_tokens} new tokens", len(gen[0]["tokens"]) / dt, "tokens/s", None))
    return rows


# ---------------------------------------------------------------------------------------------
# Learnability: the embedded default end to end

def learn(name=None):
    """SFT -> evaluate -> FPO -> evaluate on the synthetic set, with the default settings."""
    import evaluate
    name = name or time.strftime("learn-%Y%m%d-%H%M%S")
    times, metrics = {}, {}
    t_all = time.perf_counter()
    for stage in ("sft", "fpo"):
        t = time.perf_counter()
        train.main(["--stage", stage, "--name", name])
        times[stage] = time.perf_counter() - t
        t = time.perf_counter()
        ckpt = checkpoint.checkpoints(Path(checkpoint.RUNS) / name / stage)[-1]
        metrics[stage] = evaluate.main(["--ckpt", str(ckpt)])
        times[f"evaluate {stage}"] = time.perf_counter() - t
    times["total"] = time.perf_counter() - t_all
    return name, times, metrics


def learn_rows(times, metrics):
    rows = [("wall time, the default recipe", k, v, "s", TARGETS["learn_s"] if k == "total" else None)
            for k, v in times.items()]
    (s_task, s_merged), (f_task, f_merged) = (etbench.summary(metrics[k]) for k in ("sft", "fpo"))
    g = "synthetic test split, E.T.Bench metrics x 100: after SFT -> after FPO"
    target = {"tvg": TARGETS["tvg_f1"], "dvc": TARGETS["dvc_f1"]}
    for k in f_task:
        rows.append((g, k.upper(), 100 * f_task[k], "", target.get(k), 100 * s_task[k]))
    for k in f_merged:
        if f_merged[k] is not None:
            rows.append((g, f"merged {k}", f_merged[k], "", None, s_merged[k]))
    rows.append((g, "F1 (gnd): FPO - SFT", f_merged["F1 (gnd)"] - s_merged["F1 (gnd)"], "points",
                 TARGETS["fpo_gnd_change"]))
    return rows


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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", nargs="?", default="speed", choices=["speed", "learn", "realwidth"])
    ap.add_argument("--layers", type=int, default=2, help="realwidth: layers in each of ViT, Q-Former and LLM")
    ap.add_argument("--frames", type=int, default=8, help="realwidth: frames of the test clip")
    ap.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    ap.add_argument("--repeat", type=int, default=3, help="timed repetitions of each step")
    ap.add_argument("--clips", default="data/bench", help="where the generated test clips are kept")
    ap.add_argument("--name", help="learn: the run name (default learn-<date>-<time>)")
    ap.add_argument("--skip", default="", help="comma-separated parts to leave out: decode,loader,memory,steps,generate,realsize")
    args = ap.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    t = time.perf_counter()
    if args.what == "realwidth":
        rows = realwidth_figures(args.layers, args.frames, out_dir=Path(args.clips) / "realwidth")
    elif args.what == "learn":
        name, times, metrics = learn(args.name)
        rows = learn_rows(times, metrics)
        print(f"\nrun: {Path(checkpoint.RUNS) / name}")
    else:
        rows = []
        if "decode" not in skip:
            rows += decode_figures(args.clips)
        if "loader" not in skip:
            rows += loader_figures(args.clips)
        if "memory" not in skip:
            rows += memory_figures()
        if "steps" not in skip:
            rows += step_figures("tiny", 32, args.repeat) + step_figures("mid", 16, args.repeat)
        if "generate" not in skip:
            rows += generation_figures("tiny", 16)
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
        Path(args.json).write_text(json.dumps([dict(zip(("group", "figure", "value", "unit", "target", "before"), r))
                                               for r in rows], indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
