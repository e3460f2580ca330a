"""The real checkpoints' layouts (tests/layouts.py, real widths, 1-2 layers): Phi-3-mini-4k-instruct
through from_weights, E.T.Chat stage 2 and the released D2VLM through released.load, our export
read back; every tensor lands where it belongs, a layout that does not fit gives one error naming
the tensor, and E.T.Chat stage 2 -> SFT -> FPO -> export -> evaluate runs through the commands."""
import dataclasses
import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import batches
import checkpoint
import config
import data
import evaluate
import layouts
import train
from evidence import EVI, EVI_END
from model import build_model
from support import released

ONE_LAYER = dict(vision_layers=1, qformer_layers=2, llm_layers=1)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """The three real-width fixtures and a bert-base-uncased tokenizer directory (no [DEC])."""
    root = tmp_path_factory.mktemp("released")
    d = {"etchat": root / "ETChat-Phi3-Mini-Stage-2", "d2vlm": root / "D2VLM", "phi3": root / "Phi-3-mini-4k-instruct",
         "bert": root / "bert-base-uncased"}
    d["etchat_tensors"] = layouts.etchat_phi3_mini_stage_2(d["etchat"], **ONE_LAYER)
    d["d2vlm_tensors"] = layouts.d2vlm_models(d["d2vlm"], **ONE_LAYER)
    d["phi3_model"] = layouts.phi3_mini_4k_instruct(d["phi3"], layers=1)
    layouts.bert_base_uncased_tokenizer().save_pretrained(d["bert"])
    return d


def _cfg(directory):
    return dataclasses.replace(released.config_from(directory), inject_layer=1)  # 1 LLM layer: inject after it


def test_phi3_fixture_has_the_real_layout_and_loads_through_from_weights(weights):
    path = weights["phi3"]
    cfg = json.loads((path / "config.json").read_text())
    assert (cfg["sliding_window"], cfg["pad_token_id"], cfg["eos_token_id"], cfg["vocab_size"]) == (2047, 32000, 32000, 32064)
    shards = sorted(set(json.loads((path / released.INDEX).read_text())["weight_map"].values()))
    assert shards == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    with safe_open(str(path / shards[0]), framework="pt") as f:
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == "BF16"
    arch = dataclasses.replace(config.PRESETS["d2vlm-3.8b"], vision_width=64, vision_layers=1, vision_heads=4,
                               vision_mlp=128, qformer_width=64, qformer_layers=2, qformer_heads=4, qformer_mlp=128,
                               qformer_vocab=32100, num_query_tokens=4, llm_layers=1, inject_layer=1)
    m = checkpoint.from_weights(arch, llm_weights=path)
    ids = {t: m.tokenizer.convert_tokens_to_ids(t) for t in layouts.PHI3_ADDED}
    assert list(ids.values()) == list(range(32000, 32011)) and m.tokenizer.pad_token_id == 32000
    assert (m.token_id[EVI], m.token_id[EVI_END], m.token_id[data.VIDEO], m.token_id[data.END]) == (32011, 32012, 32013, 32007)
    assert m.lm_head.weight.shape == (32064, 3072)  # <evi> rows are inside Phi-3's 32064: no resize
    ref = weights["phi3_model"].state_dict()
    ours = m.llm.get_base_model().state_dict()
    for k, t in ref.items():
        got = ours.get(k, ours.get(k.replace(".weight", ".base_layer.weight")))
        torch.testing.assert_close(got, t.float(), rtol=0, atol=0, msg=k)


def test_phi3_sliding_window_is_not_applied():
    """Upstream runs eager attention, which ignores Phi-3's sliding_window (2047): so do we, on a
    sequence longer than a window of 4."""
    cfg = dataclasses.replace(config.PRESETS["tiny"], llm_layers=1, inject_layer=1)
    torch.manual_seed(0)
    m = build_model(cfg).eval()
    ids = torch.randint(10, 200, (1, 24))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.full_like(ids, batches.IGNORE),
             "answer_spans": torch.zeros(1, 0, 2, dtype=torch.long)}
    with torch.no_grad():
        full = m(batch)["logits"]
        m.decoder.config.sliding_window = 4
        windowed = m(batch)["logits"]
    torch.testing.assert_close(windowed, full, rtol=0, atol=0)


def test_etchat_stage_2_loads_exactly(weights):
    src = weights["etchat_tensors"]
    m, fresh = released.load(weights["etchat"], _cfg(weights["etchat"]), weights["bert"])
    assert fresh == ["frm_head", "evi_head"]
    own = m.state_dict()
    eva = "model.vision_tower.vision_tower.blocks.0.attn."
    for k, t in src.items():
        name = released.our_name(k)
        if name is None or k.endswith(("q_bias", "v_bias")):
            continue
        got = own.get(name, own.get(name.replace(".weight", ".base_layer.weight")))
        torch.testing.assert_close(got, t.float(), rtol=0, atol=0, msg=k)
    qkv = own["vision.encoder.layers.0.self_attn.qkv.bias"]  # LAVIS's q_bias, v_bias -> (q, 0, v)
    torch.testing.assert_close(qkv, torch.cat([src[eva + "q_bias"], torch.zeros(1408, dtype=torch.float16),
                                               src[eva + "v_bias"]]).float(), rtol=0, atol=0)
    assert m.vision.post_layernorm.eps == 1e-5  # LAVIS's ln_vision (upstream's qformer_ln)
    assert (m.token_id[EVI], m.token_id[EVI_END]) == (32011, 32012)
    qtok = m.qformer_tokenizer
    assert len(qtok) == 30523 and qtok.convert_tokens_to_ids(released.DEC) == 30522 and qtok.truncation_side == "left"
    assert not any(p.abs().sum() for n, p in m.named_parameters() if "lora_B" in n)  # fresh LoRA: B = 0


def test_released_d2vlm_loads_as_it_is(weights):
    src = weights["d2vlm_tensors"]
    m = checkpoint.from_checkpoint(weights["d2vlm"], cfg=_cfg(weights["d2vlm"]), qformer_tokenizer=weights["bert"])
    torch.testing.assert_close(m.evi_head[3].weight, src["evi_head.3.weight"].float(), rtol=0, atol=0)
    torch.testing.assert_close(m.frm_head[0].bias, src["frm_head.0.bias"].float(), rtol=0, atol=0)
    torch.testing.assert_close(m.aggregator.out[1].weight, src["model.qformer_v_proj.1.weight"].float(), rtol=0, atol=0)
    assert (m.token_id[EVI], m.token_id[EVI_END]) == (32011, 32012)
    with pytest.raises(FileNotFoundError, match=r"holds no Q-Former tokenizer .* --qformer-tokenizer"):
        released.load(weights["d2vlm"], _cfg(weights["d2vlm"]))


def _variant(src, dst, edit=None, tokens=None):
    """A copy of a released directory (shards 2-3 linked) whose first shard went through edit(tensors)
    and whose tokenizer has `tokens` added first."""
    dst.mkdir()
    for f in src.iterdir():
        if f.name.startswith("model-00001"):
            tensors = load_file(str(f))
            save_file(edit(tensors) if edit else tensors, str(dst / f.name))
        elif f.suffix == ".safetensors":
            (dst / f.name).symlink_to(f)
        elif f.is_file():
            shutil.copy(f, dst / f.name)
    if tokens:
        from transformers import AutoTokenizer, PretrainedConfig
        tok = AutoTokenizer.from_pretrained(src, config=PretrainedConfig())
        tok.add_special_tokens({"additional_special_tokens": tokens})
        tok.save_pretrained(dst)
    return dst


def test_a_layout_that_does_not_fit_names_the_tensor(weights, tmp_path):
    src, bert = weights["etchat"], weights["bert"]
    first = load_file(str(src / "model-00001-of-00003.safetensors"))
    bias = next(k for k in first if k.endswith("v_bias"))
    no_bias = _variant(src, tmp_path / "a", lambda t: {k: v for k, v in t.items() if k != bias})
    with pytest.raises(ValueError, match=rf"a: tensor {bias} is missing"):
        released.load(no_bias, _cfg(no_bias), bert)
    ln = "model.qformer_ln.weight"
    assert ln in first
    narrow = _variant(src, tmp_path / "b", lambda t: {**t, ln: t[ln][:-1]})
    with pytest.raises(ValueError, match=rf"b: tensor {ln} has shape \(1407,\), this model expects \(1408,\)"):
        released.load(narrow, _cfg(src), bert)
    extra = _variant(src, tmp_path / "c", lambda t: {**t, "model.time_head.weight": torch.ones(2)})
    with pytest.raises(ValueError, match=r"c: tensor model.time_head.weight has no place in this model"):
        released.load(extra, _cfg(extra), bert)
    vid = _variant(src, tmp_path / "d", tokens=["<vid>"])  # E.T.Chat stage 3's tokenizer: <vid> = 32011
    with pytest.raises(ValueError, match=r"gives <evi> the id 32012, the weights use 32011"):
        released.load(vid, _cfg(vid), bert)
    wide = dataclasses.replace(_cfg(src), qformer_vocab=30524)
    with pytest.raises(ValueError, match=r"tensor model.qformer_bert.bert.embeddings.word_embeddings.weight has shape "
                                         r"\(30523, 768\), this model expects \(30524, 768\)"):
        released.load(src, wide, bert)


def test_export_round_trip_same_logits(tmp_path, synthetic):
    """Our checkpoint (tiny, LoRA trained to non-zero) -> the released layout -> load: the same
    logits in fp32; in bf16, those of the model with its weights rounded to bf16."""
    cfg = config.PRESETS["tiny"]
    torch.manual_seed(0)
    m = build_model(cfg).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    records = json.loads((synthetic / "train.json").read_text())[:3]
    ds = batches.VideoDataset(records, (synthetic / "videos"), m.tokenizer, cfg)
    batch = batches.collate([ds[i] for i in range(len(ds))], m.tokenizer, m.qformer_tokenizer, cfg)
    with torch.no_grad():
        want = m(batch)
    out = released.export(m, tmp_path / "fp32", torch.float32)
    assert json.loads((out / "config.json").read_text())["model_type"] == released.MODEL_TYPE
    names = set(load_file(str(out / checkpoint.WEIGHTS)))
    assert "model.vision_tower.vision_tower.blocks.0.attn.q_bias" in names and not any("lora" in k for k in names)
    back = checkpoint.from_checkpoint(out).eval()
    assert back.cfg == cfg and back.token_id == m.token_id
    with torch.no_grad():
        got = back(batch)
    torch.testing.assert_close(got["logits"], want["logits"], rtol=0, atol=1e-4)
    torch.testing.assert_close(got["sim"], want["sim"], rtol=0, atol=1e-4)
    half = checkpoint.from_checkpoint(released.export(m, tmp_path / "bf16")).eval()
    rounded = checkpoint.from_checkpoint(out).eval()
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.to(torch.bfloat16).float())
        torch.testing.assert_close(half(batch)["logits"], rounded(batch)["logits"], rtol=0, atol=1e-4)
    assert (tmp_path / "fp32" / checkpoint.WEIGHTS).stat().st_size > 1.9 * (tmp_path / "bf16" / checkpoint.WEIGHTS).stat().st_size


def test_etchat_stage_2_to_sft_fpo_export_evaluate(weights, synthetic, tmp_path):
    """The paper's route on the real layouts: SFT from E.T.Chat stage 2 (2 steps), FPO (2 steps),
    export in the released layout, evaluate.py on the export; and the released D2VLM evaluated as
    it is. fps 0.2 keeps it to 7 frames a video."""
    common = ["--data", str((synthetic / "train.json")), "--videos", str((synthetic / "videos")), "--out", str(tmp_path / "runs"),
              "--name", "et", "--workers", "0", "--max-steps", "2", "--log-every", "1"]
    train.main(["--stage", "sft", "--init", str(weights["etchat"]), "--qformer-tokenizer", str(weights["bert"]),
                "--set", "inject_layer=1", "fps=0.2", *common])
    sft = tmp_path / "runs" / "et" / "sft" / "step_000002"
    assert checkpoint.read_config(sft).llm_width == 3072 and (sft / checkpoint.QFORMER_TOKENIZER).is_dir()
    train.main(["--stage", "fpo", *common])
    fpo = tmp_path / "runs" / "et" / "fpo" / "step_000002"
    rows = [json.loads(line) for line in (fpo.parent / "log.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows if "loss" in r)
    checkpoint.main(["export", "--ckpt", str(fpo), "--out", str(tmp_path / "exported")])
    test = json.loads((synthetic / "test.json").read_text())[:2]
    (tmp_path / "few.json").write_text(json.dumps(test))
    ev = ["--data", str(tmp_path / "few.json"), "--videos", str((synthetic / "videos")), "--max-new-tokens", "6"]
    metrics = evaluate.main(["--ckpt", str(tmp_path / "exported"), *ev])
    assert metrics and (checkpoint.results_dir(tmp_path / "exported") / "predictions_few_max6.json").is_file()
    preds = json.loads((checkpoint.results_dir(tmp_path / "exported") / "predictions_few_max6.json").read_text())
    assert [p["video"] for p in preds] == [r["video"] for r in test] and all(isinstance(p["a"], str) for p in preds)
    metrics = evaluate.main(["--ckpt", str(weights["d2vlm"]), "--qformer-tokenizer", str(weights["bert"]),
                             "--set", "inject_layer=1", "fps=0.2", *ev])
    assert metrics
