"""Speed, memory and learnability figures (not tests). Each ratio is measured within one run, on
this machine, between things that do the same work.

    python bench.py [--json FILE]         one table: frame sampling, the <evi> overhead of a training
                                          step, FPO step / SFT step, generation tokens/s at batch
                                          1 / 8 / 32, the GPU proxies (aten ops and host reads per
                                          step and per token, distinct LLM shapes per epoch:
                                          bench_gpu.py), and (CUDA only) the real-size model
    python bench.py gpu [--json FILE]     every GPU figure in one run (bench_gpu.gpu_figures): the tiny
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
                                          the paper's ablation tables in miniature (ablations.py): each
                                          row trained (SFT from the miniature's starting point, or --init),
                                          predicted and scored per seed on the ablation split; resumable;
                                          runs/ablate/ablations.png + curves per run
    python bench.py realwidth [--layers 2 --frames 8]   the real widths with few layers on the CPU
                                          (bf16), from an E.T.Chat stage-2 directory: load, SFT step,
                                          FPO step, save, reload, generation, export

The `<evi>` overhead compares a D2VLM SFT step (video encoder, prefix pass, <evi> injection, suffix
pass, heads, the three losses) with a plain video-LLM step on the same tokens: the same video encoder,
then Phi-3 (same LoRA) once over [text, video tokens] with the token loss only. The decoding
figures (frame sampling, the data loader at real size) are measured by bench_decode.py.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

import checkpoint
import cli
import data
import decoding
import etbench
import event_videos
import fpo
import losses
import ablations
import bench_gpu
import model
import plots
import released
import synth
import train
from bench_decode import ETINSTRUCT, decode_figures, loader_figures, timed
from config import PRESETS
from evidence import EVI, EVI_END
from files import atomic_path, read_json

TARGETS = {"evi_overhead": ("<=", 1.15), "fpo_over_sft": ("<=", 1.6), "etinstruct_hours": ("<=", 6.0),
           "learn_s": ("<=", 600.0), "tvg_f1": (">=", 80.0), "dvc_f1": (">=", 60.0), "fpo_gnd_change": (">=", -1.0),
           "tvg_picks": (">=", 85.0), "mfu_batch1": (">=", 0.25), "mfu_chosen": (">=", 0.45),
           "tiny_gpu_over_cpu": (">=", 5.0), "tokens_s_batch1": (">=", 80.0), "tokens_s_batch8": (">=", 500.0),
           "etbench_hours": ("<=", 0.5)}


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
    import evaluate
    cfg = PRESETS[preset]
    torch.manual_seed(0)
    with torch.device(device):
        m = model.for_inference(model.build_model(cfg), device)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    ev = {"prompt": "Find the moment when a red square appears.", "question_frames": [], "response": "", "frames": []}
    g = f"generation, {preset}, {frames} frames, {torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}"
    rows, per, split = [], {}, {}
    for bs in batch_sizes:
        clips = [torch.randint(0, 255, (frames, 3, cfg.image_size, cfg.image_size), dtype=torch.uint8) for _ in range(bs)]
        b = evaluate.on_device(m, data.collate([{"evidence": ev, "frames": c} for c in clips], m.tokenizer,
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
# The real size: memory, GPU steps (CUDA), real widths on the CPU

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


def realwidth_figures(layers: int = 2, frames: int = 8, new_tokens: int = 8, out_dir="data/bench/realwidth"):
    """The real model at `layers` layers in each of ViT, Q-Former and LLM, as the paper starts it: an
    E.T.Chat stage-2 directory in the released layout (tests/layouts.py writes one at real widths,
    random weights, fp16, with Phi-3's tokenizer), read by released.load; on the CPU as train.py runs
    a GPU: frozen weights held in bf16, bf16 autocast. One SFT step, one FPO step (packed pair),
    save, checkpoint.from_checkpoint (the trained weights must come back bit for bit), greedy
    generation, export in the released layout. Seconds for each, and generated tokens/s."""
    sys.path.insert(0, str(Path(__file__).resolve().parent / "tests"))
    import layouts
    out = Path(out_dir)
    times = {}
    t = time.perf_counter()
    etchat, bert = out / "ETChat-Phi3-Mini-Stage-2", out / "bert-base-uncased"
    if not etchat.is_dir() or released.config_from(etchat).llm_layers != layers:
        shutil.rmtree(etchat, ignore_errors=True)
        layouts.etchat_phi3_mini_stage_2(etchat, vision_layers=layers, qformer_layers=layers, llm_layers=layers)
        layouts.bert_base_uncased_tokenizer().save_pretrained(bert)
        times["write the E.T.Chat stage-2 directory (fp16)"] = time.perf_counter() - t
    base = released.config_from(etchat)
    cfg = dataclasses.replace(base, inject_layer=min(base.inject_layer, layers))
    t = time.perf_counter()
    torch.manual_seed(0)
    m = model.hold_frozen_in(released.load(etchat, cfg, bert)[0], torch.bfloat16).train()
    times["released.load (E.T.Chat stage 2)"] = time.perf_counter() - t
    opt = train.make_optimizer(m, cfg)
    sft_b, pair_b, _ = dvc_batches(m, frames)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    for name, objective, b in (("SFT step", losses.sft_objective, sft_b), ("FPO step (packed pair)", fpo.objective, pair_b)):
        t = time.perf_counter()
        loss = train_step(m, opt, objective, b, autocast)
        times[name] = time.perf_counter() - t
        if not torch.isfinite(loss):
            raise RuntimeError(f"realwidth: the {name} loss is {loss.item()}")
    ckpt = out / "step"
    shutil.rmtree(ckpt, ignore_errors=True)
    with atomic_path(ckpt) as tmp:
        t = time.perf_counter()
        tmp.mkdir(parents=True)
        checkpoint.save_weights(m, tmp, full=True)
        times["save (every tensor)"] = time.perf_counter() - t
    t = time.perf_counter()
    back = checkpoint.from_checkpoint(ckpt).eval()
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
    shutil.rmtree(out / "export", ignore_errors=True)
    t = time.perf_counter()
    released.export(back, out / "export")
    times["export (released layout, LoRA merged, bf16)"] = time.perf_counter() - t
    g = f"real widths on the CPU: {layers} layer(s) each, bf16 autocast, frozen weights in bf16, {frames} frames"
    rows = [(g, k, v, "s", None) for k, v in times.items()]
    rows.append((g, "trained weights after from_checkpoint: bit-identical (1 = yes)", float(same), "", None))
    rows.append((g, f"greedy generation, {new_tokens} new tokens", len(gen[0]["tokens"]) / dt, "tokens/s", None))
    return rows


# ---------------------------------------------------------------------------------------------
# Kills: a run killed at a random moment (kill -9), then resumed, ends with the weights of an
# uninterrupted run

def kill_figures(n: int = 10, seed: int = 0, out_dir="data/bench/kills", steps: int = 12):
    """`n` times: start `train.py` (tiny, 2 records a step over 24 synthetic records, a checkpoint
    every 2 steps), kill -9 it after a random fraction of an uninterrupted run's wall time, then
    `--resume` it to the end. Counts the kills that landed during a save (a temporary checkpoint
    directory present) and the resumes whose final weight digest equals the uninterrupted run's."""
    import random
    import signal
    import subprocess
    out = Path(out_dir)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    event_videos.ensure_synthetic(event_videos.SYNTHETIC)
    records = json.loads((event_videos.SYNTHETIC / "train.json").read_text())[:24]
    (out / "records.json").write_text(json.dumps(records))
    base = [sys.executable, str(Path(__file__).resolve().parent / "train.py"), "--data", str(out / "records.json"),
            "--videos", str(event_videos.SYNTHETIC / "videos"), "--out", str(out), "--workers", "0",
            "--max-steps", str(steps), "--save-every", "2", "--set", "batch_size=2"]

    def digest(name):
        rows = [json.loads(x) for x in (out / name / "sft" / "log.jsonl").read_text().splitlines()]
        return rows[-1]["rank_digests"][0]
    t = time.perf_counter()
    subprocess.run([*base, "--name", "whole"], check=True, capture_output=True)
    wall, want = time.perf_counter() - t, digest("whole")
    rng, during_save, same = random.Random(seed), 0, 0
    for i in range(n):
        name = f"kill{i}"
        p = subprocess.Popen([*base, "--name", name], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.3, 0.95) * wall)
        p.send_signal(signal.SIGKILL)
        p.wait()
        during_save += any((out / name / "sft").glob(".step_*"))
        resume = ["--resume"] if checkpoint.checkpoints(out / name / "sft") else []
        subprocess.run([*base, "--name", name, *resume], check=True, capture_output=True)
        same += digest(name) == want
    g = f"kill -9 at a random moment, then --resume (tiny, {steps} steps, a checkpoint every 2)"
    return [(g, "runs killed", float(n), "", None), (g, "kills that landed during a save", float(during_save), "", None),
            (g, "resumed runs ending bit-identical to the uninterrupted run", float(same), "", None),
            (g, "uninterrupted run", wall, "s", None)]


# ---------------------------------------------------------------------------------------------
# Learnability: the embedded default end to end

def learn(name=None, seed=0):
    """The quickstart on the synthetic set with the default settings and `seed`: the starting point
    when there is none yet (its time counted, as on first use), SFT -> evaluate -> FPO -> evaluate.
    Returns the run name, the times, the metrics and the TVG picks (ablations.tvg_picks) per stage."""
    import evaluate
    name = name or time.strftime("learn-%Y%m%d-%H%M%S")
    times, metrics, picks = {}, {}, {}
    t_all = time.perf_counter()
    if not checkpoint.checkpoints(Path(checkpoint.RUNS) / train.START / "pretrain"):
        t = time.perf_counter()
        train.main(["--stage", "pretrain"])
        times["pretrain"] = time.perf_counter() - t
    test = read_json(event_videos.SYNTHETIC / "test.json")
    for stage in ("sft", "fpo"):
        t = time.perf_counter()
        train.main(["--stage", stage, "--name", name, "--seed", str(seed)])
        times[stage] = time.perf_counter() - t
        t = time.perf_counter()
        ckpt = checkpoint.checkpoints(Path(checkpoint.RUNS) / name / stage)[-1]
        metrics[stage] = evaluate.main(["--ckpt", str(ckpt)])
        times[f"evaluate {stage}"] = time.perf_counter() - t
        picks[stage] = ablations.tvg_picks(read_json(checkpoint.results_dir(ckpt) / "predictions_test.json"), test)
    times["total"] = time.perf_counter() - t_all
    curves = Path(checkpoint.RUNS) / name / "curves.png"
    plots.curves(Path(checkpoint.RUNS) / name, curves)
    print(f"training curves: {curves}", file=sys.stderr)
    return name, times, metrics, picks


def learn_rows(times, metrics, picks):
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
    (s_got, n), (f_got, _) = picks["sft"]["multi"], picks["fpo"]["multi"]
    rows.append((g, f"TVG on videos with several events: the named event picked, of {n} (chance "
                    f"{picks['fpo']['chance']:g}), %", 100 * f_got / n, "", TARGETS["tvg_picks"], 100 * s_got / n))
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


def ablate(args):
    """bench.py ablate: run what is missing, print both tables, draw them, keep the results."""
    rows = [r.strip() for r in args.only.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ablations.ROWS]
    if unknown:
        raise SystemExit(f"--only {args.only}: unknown rows {', '.join(unknown)} (rows: {', '.join(ablations.ROWS)})")
    if args.jobs is not None and args.jobs < 1:
        raise SystemExit(f"--jobs {args.jobs}: at least 1")
    t = time.perf_counter()
    results = ablations.run_all(rows, args.seeds, extra=["--set", *args.set] if args.set else [], kept_only=args.kept,
                                jobs=args.jobs, start=args.init)
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
        Path(args.json).write_text(json.dumps({"results": results, "summary": summary, "orderings": steps}, indent=1), encoding="utf-8")
    return summary


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
    ap.add_argument("--skip", default="", help="comma-separated parts to leave out: decode,loader,memory,steps,generate,"
                                               "host,shapes,realsize")
    args = ap.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
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
        rows = bench_gpu.gpu_figures(Path(args.clips) / "gpu")
    elif args.what == "learn":
        name, times, metrics, picks = learn(args.name, args.seed)
        rows = learn_rows(times, metrics, picks)
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
            rows += generation_figures("tiny", 16)[0]
        if "host" not in skip:
            rows += bench_gpu.host_figures("mid")
        if "shapes" not in skip:
            rows += bench_gpu.shape_figures("tiny")
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
    cli.run(main)
