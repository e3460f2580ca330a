"""Whole runs measured: the real widths on the CPU, runs killed and resumed, the quickstart end to end.

    realwidth_figures(layers, frames, ...)    an E.T.Chat stage-2 directory at real widths, few layers:
                                              load, SFT and FPO step, save, reload, generation, export
    kill_figures(n, ...)                      train.py killed (kill -9) at random moments and resumed
    learn(name, seed) / learn_rows(...)       the embedded default end to end and its table
"""
from __future__ import annotations

import dataclasses
import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

import batches
import checkpoint
import decoding
import evaluate
import event_videos
import fpo
import losses
import model
import train
from measure import REPO, ablations, plots
from measure.steps import QUESTION, dvc_batches, train_step
from measure.targets import TARGETS
from scoring import etbench
from support import released
from support.files import atomic_path, read_json
from support.rundir import param_digest


def realwidth_figures(layers: int = 2, frames: int = 8, new_tokens: int = 8, out_dir="data/bench/realwidth"):
    """The real model at `layers` layers in each of ViT, Q-Former and LLM, as the paper starts it: an
    E.T.Chat stage-2 directory in the released layout (tests/layouts.py writes one at real widths,
    random weights, fp16, with Phi-3's tokenizer), read by released.load; on the CPU as train.py runs
    a GPU: frozen weights held in bf16, bf16 autocast. One SFT step, one FPO step (packed pair),
    save, checkpoint.from_checkpoint (the trained weights must come back bit for bit), greedy
    generation, export in the released layout. Seconds for each, and generated tokens/s."""
    sys.path.insert(0, str(REPO / "tests"))
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
    same = param_digest(back) == param_digest(m)
    prompt = batches.collate([{"evidence": QUESTION, "frames": torch.randint(0, 255, (frames, 3, cfg.image_size, cfg.image_size),
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
    out = Path(out_dir)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    event_videos.ensure_synthetic(event_videos.SYNTHETIC)
    records = json.loads((event_videos.SYNTHETIC / "train.json").read_text())[:24]
    (out / "records.json").write_text(json.dumps(records))
    base = [sys.executable, str(REPO / "train.py"), "--data", str(out / "records.json"),
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
    name = name or time.strftime("learn-%Y%m%d-%H%M%S")
    times, metrics, picks = {}, {}, {}
    t_all = time.perf_counter()
    if train.intact_start(checkpoint.RUNS)[0] is None:
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
