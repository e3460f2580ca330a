"""train.py: what one step changes, the schedule, checkpoints, exact resume, 2-process DDP, and an
over-fit run in which the tiny model learns to ground events of a handful of synthetic videos."""
import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import batches
import checkpoint
import config
import decoding
import losses
import model
import train
from synth import KINDS
from test_model import write_weight_directories


ROOT = Path(__file__).resolve().parent.parent
DDP_TIMEOUT_S = 600  # alone the run takes ~20 s; on a busy 2-core machine gloo waits can stretch it many times over


def run(args, out, name):
    train.main([*args, "--out", str(out), "--name", name, "--workers", "0"])
    return out / name / "sft"


def log(run_dir):
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def test_lr_schedule():
    total, warm = 100, 0.03
    f = [train.lr_factor(s, total, warm) for s in range(total)]
    assert f[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert f[3] == pytest.approx(1.0) and f[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 96 / 97)))
    assert all(a >= b for a, b in zip(f[2:], f[3:]))  # falls after the warm-up
    assert f[3 + 97 // 2] == pytest.approx(0.5, abs=0.02)


def test_set_overrides_accumulate_and_are_typed():
    args = train.get_args(["--stage", "sft", "--set", "w_cons=0", "epochs=2", "--set", "train_base=true"])
    cfg = config.configure(config.PRESETS["tiny"], args.set)
    assert (cfg.w_cons, cfg.epochs, cfg.train_base) == (0.0, 2, True) and isinstance(cfg.epochs, int)
    with pytest.raises(SystemExit, match="train_base takes true or false"):
        config.configure(cfg, ["train_base=yes"])
    with pytest.raises(SystemExit, match="epochs must be of type int"):
        config.configure(cfg, ["epochs=1.5"])


def test_one_step_changes_only_trained_tensors(synthetic):
    cfg = config.PRESETS["tiny"]
    torch.manual_seed(0)
    m = model.build_model(cfg)
    ds = batches.VideoDataset(synthetic / "mixed.json", synthetic / "videos", m.tokenizer, cfg)
    batch = batches.collate([ds[0], ds[7]], m.tokenizer, m.qformer_tokenizer, cfg)
    opt = train.make_optimizer(m, cfg)
    lora = {id(p) for n, p in m.named_parameters() if "lora_" in n}
    assert [g["lr"] for g in opt.param_groups] == [cfg.lr_lora, cfg.lr_other]
    assert {id(p) for p in opt.param_groups[0]["params"]} == lora
    assert {id(p) for p in opt.param_groups[1]["params"]} == {id(p) for n, p in m.named_parameters()
                                                              if p.requires_grad and "lora_" not in n}
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    losses.sft_objective(m(batch), batch, cfg)["loss"].backward()
    opt.step()
    changed = {n for n, p in m.named_parameters() if not torch.equal(before[n], p)}
    trained = {n for n, p in m.named_parameters() if p.requires_grad}
    assert changed <= trained
    assert {n for n in trained if n.startswith("vision.")} == {"vision.post_layernorm.weight", "vision.post_layernorm.bias"}
    # every kind of trained tensor moved (LoRA A has no gradient while B is still 0)
    for part in ("lora_B", "embed_tokens", "lm_head", "frm_head", "evi_head", "aggregator", "query_tokens", "post_layernorm",
                 "qformer.encoder.layer.0.attention", "qformer.encoder.layer.0.crossattention"):
        assert any(part in n for n in changed), part


def test_frozen_weights_in_bf16_train_under_autocast(synthetic):
    """What train.py does on CUDA, here with the CPU's bf16 autocast: frozen weights held in bf16,
    trained ones in fp32; a step moves only the trained ones and keeps their dtype."""
    cfg = config.PRESETS["tiny"]
    torch.manual_seed(0)
    m = model.hold_frozen_in(model.build_model(cfg), torch.bfloat16)
    assert {p.dtype for p in m.parameters() if not p.requires_grad} == {torch.bfloat16}
    assert {p.dtype for p in m.parameters() if p.requires_grad} == {torch.float32}
    ds = batches.VideoDataset(synthetic / "mixed.json", synthetic / "videos", m.tokenizer, cfg)
    batch = batches.collate([ds[0], ds[7]], m.tokenizer, m.qformer_tokenizer, cfg)
    opt = train.make_optimizer(m, cfg)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = losses.sft_objective(m(batch), batch, cfg)["loss"]
    loss.backward()
    opt.step()
    changed = {n for n, p in m.named_parameters() if not torch.equal(before[n], p)}
    assert torch.isfinite(loss) and changed and changed <= {n for n, p in m.named_parameters() if p.requires_grad}
    assert {p.dtype for p in m.parameters() if p.requires_grad} == {torch.float32}


def test_train_base_trains_the_frozen_parts_too(synthetic):
    cfg = dataclasses.replace(config.PRESETS["tiny"], train_base=True)
    torch.manual_seed(0)
    m = model.build_model(cfg)
    assert all(p.requires_grad for p in m.parameters())
    ds = batches.VideoDataset(synthetic / "mixed.json", synthetic / "videos", m.tokenizer, cfg)
    batch = batches.collate([ds[0], ds[7]], m.tokenizer, m.qformer_tokenizer, cfg)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    opt = train.make_optimizer(m, cfg)
    losses.sft_objective(m(batch), batch, cfg)["loss"].backward()
    opt.step()
    changed = {n for n, p in m.named_parameters() if not torch.equal(before[n], p)}
    for part in ("vision.embeddings.patch_embedding", "vision.encoder.layers.1.mlp", "qformer.encoder.layer.0.intermediate",
                 "base_model.model.model.layers.0.mlp"):
        assert any(n.startswith(part) or part in n for n in changed), part


def test_checkpoints_resume_exactly(synthetic, tmp_path):
    args = ["--data", str(synthetic / "mixed.json"), "--videos", str(synthetic / "videos"), "--max-steps", "5",
            "--save-every", "1", "--keep", "2", "--log-every", "1", "--set", "batch_size=2", "grad_accum=2"]
    straight = run(args, tmp_path, "straight")
    assert [p.name for p in checkpoint.checkpoints(straight)] == ["step_000004", "step_000005"]  # keep the last 2
    assert not list(straight.glob(".*tmp*"))
    # 12 samples, 6 micro-batches an epoch, accumulation 2: step 3 ends epoch 0
    assert [r["epoch"] for r in log(straight)[:5]] == [0, 0, 1, 1, 1]
    stopped = run([*args, "--stop-after", "2"], tmp_path, "resumed")
    assert [p.name for p in checkpoint.checkpoints(stopped)] == ["step_000001", "step_000002"]
    st = torch.load(stopped / "step_000002" / checkpoint.STATE, weights_only=True)
    assert (st["step"], st["epoch"], st["micro"]) == (2, 0, 4)
    at_step_2 = train.param_digest(checkpoint.from_checkpoint(stopped / "step_000002"))
    run([*args, "--resume"], tmp_path, "resumed")
    assert [r["step"] for r in log(stopped) if "step" in r] == [1, 2, 3, 4, 5]
    a = checkpoint.from_checkpoint(straight / "step_000005")
    b = checkpoint.from_checkpoint(stopped / "step_000005")
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
    # and the resumed steps did train: the final weights differ from the ones the resume started from
    assert train.param_digest(b) != at_step_2
    assert train.param_digest(a) == log(straight)[-1]["rank_digests"][0]


def test_two_process_ddp_ends_identical(synthetic, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py",
           "--data", str(synthetic / "mixed.json"), "--videos", str(synthetic / "videos"), "--max-steps", "3",
           "--workers", "0", "--out", str(tmp_path), "--name", "ddp", "--log-every", "1",
           "--set", "batch_size=2", "grad_accum=2"]  # 3 micro-batches a rank: steps of 2 and 1 (an epoch's end)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=DDP_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:  # say where it stood, not just that it stood
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        pytest.fail(f"torchrun did not end in {DDP_TIMEOUT_S} s; its stderr ended with:\n{err[-2000:]}")
    assert res.returncode == 0, res.stderr[-2000:]
    summary = log(tmp_path / "ddp" / "sft")[-1]
    assert "2 process(es) x batch 2 x accumulation 2" in res.stderr
    assert [r["epoch"] for r in log(tmp_path / "ddp" / "sft")[:3]] == [0, 1, 1]
    d = summary["rank_digests"]
    assert len(d) == 2 and d[0] == d[1]
    m = checkpoint.from_checkpoint(tmp_path / "ddp" / "sft" / "step_000003")
    assert train.param_digest(m) == d[0]
    torch.manual_seed(0)
    init = model.build_model(config.PRESETS["tiny"])
    assert train.param_digest(init) != d[0]


def test_overfit_grounds_tvg_events(synthetic, tmp_path):
    """The tiny model from scratch, trained on the tvg questions of 6 videos, must answer them with
    spans of mean IoU >= 0.7 (generation, not teacher forcing)."""
    out = run(["--data", str(synthetic / "tvg.json"), "--videos", str(synthetic / "videos"), "--max-steps", "80",
               "--log-every", "20", "--set", "batch_size=6"], tmp_path, "overfit")
    records = log(out)
    assert records[-2]["gnd"] < 0.5 * records[0]["gnd"]
    m = checkpoint.from_checkpoint(out / "step_000080").eval()
    ds = batches.VideoDataset(synthetic / "tvg.json", synthetic / "videos", m.tokenizer, m.cfg, with_response=False)
    samples = [ds[i] for i in range(len(ds))]
    outs = decoding.generate(m, batches.collate(samples, m.tokenizer, m.qformer_tokenizer, m.cfg, with_response=False),
                             max_new_tokens=24)
    ious = []
    for o, s in zip(outs, samples):
        (gs, ge), (ps, pe) = s["evidence"]["spans"][0], (o["spans"][0] if o["spans"] else (0.0, 0.0))
        ious.append(max(0.0, min(ge, pe) - max(gs, ps)) / (max(ge, pe) - min(gs, ps)))
    assert sum(ious) / len(ious) >= 0.7, (ious, [o["text"] for o in outs])


def test_fpo_after_sft_end_to_end_with_sft_reference(synthetic, tmp_path):
    base = ["--data", str(synthetic / "mixed.json"), "--videos", str(synthetic / "videos"), "--log-every", "1"]
    run([*base, "--max-steps", "3"], tmp_path, "e2e")
    fpo_args = [*base, "--stage", "fpo", "--ref", "sft", "--max-steps", "4"]
    train.main([*fpo_args, "--out", str(tmp_path), "--name", "e2e", "--workers", "0", "--stop-after", "2"])
    out = tmp_path / "e2e" / "fpo"
    first = log(out)[0]
    # the policy starts as the reference: zero rewards, loss log 2
    assert abs(first["rewards/chosen"]) < 1e-4 and abs(first["rewards/rejected"]) < 1e-4
    assert first["fpo"] == pytest.approx(math.log(2), abs=1e-4)
    tiny = config.PRESETS["tiny"]  # the FPO stage's learning rates (step 1: warm-up factor 1)
    assert first["lr_lora"] == pytest.approx(tiny.lr_lora * tiny.fpo_lr_scale) and tiny.fpo_lr_scale < 1
    pairs = json.loads((out / "pairs.json").read_text())
    assert len(pairs) == 12 and {p["kind"] for p in pairs} <= set(KINDS)
    st = torch.load(out / "step_000002" / checkpoint.STATE, weights_only=True)
    assert st["ref"] == "sft" and st["ref_logprobs"].shape == (12, 4)
    train.main([*fpo_args, "--out", str(tmp_path), "--name", "e2e", "--workers", "0", "--resume"])
    records = [r for r in log(out) if "step" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert abs(records[-1]["rewards/margins"]) > 0  # the policy moved away from the reference
    m = checkpoint.from_checkpoint(out / "step_000004")
    sft = checkpoint.from_checkpoint(tmp_path / "e2e" / "sft" / "step_000003")
    assert train.param_digest(m) != train.param_digest(sft)
    # a new run must not write over these checkpoints
    with pytest.raises(SystemExit, match="already holds checkpoints"):
        train.main([*fpo_args, "--out", str(tmp_path), "--name", "e2e", "--workers", "0"])
    # without --max-steps the stage lasts fpo_epochs passes: 12 pairs / batch 4 = 3 steps an epoch
    train.main([*base, "--stage", "fpo", "--init", str(tmp_path / "e2e" / "sft" / "step_000003"), "--out",
                str(tmp_path), "--name", "frac", "--workers", "0", "--stop-after", "1"])
    st = torch.load(tmp_path / "frac" / "fpo" / "step_000001" / checkpoint.STATE, weights_only=True)
    assert st["total"] == math.ceil(tiny.fpo_epochs * 3) == 2


def test_fpo_from_the_merged_sft_model_as_released(synthetic, tmp_path):
    """--set fpo_start=merged: the SFT LoRA merged, a fresh LoRA trained; at step 1 the policy is
    still the SFT reference (zero rewards), the checkpoints hold every tensor, and they reload."""
    base = ["--data", str(synthetic / "mixed.json"), "--videos", str(synthetic / "videos"), "--log-every", "1"]
    run([*base, "--max-steps", "2"], tmp_path, "merged")
    train.main([*base, "--stage", "fpo", "--ref", "sft", "--max-steps", "2", "--set", "fpo_start=merged",
                "--out", str(tmp_path), "--name", "merged", "--workers", "0"])
    first = log(tmp_path / "merged" / "fpo")[0]
    assert abs(first["rewards/chosen"]) < 1e-4 and abs(first["rewards/rejected"]) < 1e-4
    ckpt = tmp_path / "merged" / "fpo" / "step_000002"
    with safe_open(str(ckpt / checkpoint.WEIGHTS), framework="pt") as f:
        assert f.metadata()["full"] == "True"
    m = checkpoint.from_checkpoint(ckpt)
    assert m.cfg.fpo_start == "merged" and any(p.any() for n, p in m.named_parameters() if "lora_B" in n)


def test_sft_from_our_checkpoint_on_weight_directories(synthetic, tmp_path):
    """SFT from one of our checkpoints (as from the miniature's starting point) with --vision-weights /
    --llm-weights: that checkpoint's LoRA is merged into the LLM, so the new run's checkpoints hold
    every tensor and reload without the directories; --set lora_r is the fresh LoRA's rank. FPO that
    would train that LoRA on at another rank is refused in one line."""
    ib, plain = write_weight_directories(tmp_path, model.build_model(config.PRESETS["tiny"]))
    base = ["--data", str(synthetic / "tvg.json"), "--videos", str(synthetic / "videos"), "--max-steps", "1",
            "--vision-weights", str(tmp_path / "instructblip"), "--llm-weights", str(tmp_path / "phi3")]
    first = run(base, tmp_path, "first") / "step_000001"
    assert not checkpoint.is_full(first)  # the frozen weights are the directories'
    second = run([*base, "--init", str(first), "--set", "lora_r=8"], tmp_path, "second") / "step_000001"
    assert checkpoint.is_full(second)
    back = checkpoint.from_checkpoint(second)  # no weight directories needed
    with_dirs = checkpoint.from_checkpoint(second, tmp_path / "instructblip", tmp_path / "phi3")
    torch.testing.assert_close(back.state_dict(), with_dirs.state_dict(), rtol=0, atol=0)
    assert back.cfg.lora_r == 8 and all(p.shape[0] == 8 for n, p in back.named_parameters() if "lora_A" in n)
    merged = back.decoder.layers[0].self_attn.qkv_proj.base_layer.weight
    assert not torch.equal(merged, plain.model.layers[0].self_attn.qkv_proj.weight)  # the first run's LoRA, merged
    with pytest.raises(SystemExit, match=r"fpo_start=continue trains this checkpoint's LoRA on \(lora_r=8 there, 4 here\)"):
        run(["--stage", "fpo", *base, "--init", str(second), "--set", "lora_r=4"], tmp_path, "second")


def test_two_steps_without_semantic_capture(synthetic, tmp_path):
    """Ablation B2 trains (finite losses, the grounding terms still there) and its checkpoint keeps the switch."""
    out = run(["--data", str(synthetic / "tvg.json"), "--videos", str(synthetic / "videos"), "--max-steps", "2",
               "--log-every", "1", "--set", "semantic_capture=false"], tmp_path, "b2")
    rows = log(out)
    assert all(math.isfinite(r["loss"]) and r["gnd"] > 0 for r in rows[:-1])
    assert checkpoint.read_config(out / "step_000002").semantic_capture is False
