"""checkpoint.py on checkpoint directories laid out as the real ones (tests/layouts.py): every tensor
lands where it belongs, and a layout that does not fit gives one error naming the tensor."""
import dataclasses
import json

import pytest
import torch
from safetensors import safe_open

import checkpoint
import config
import layouts

# the real vision and Q-Former widths with 1 and 2 layers; a small LLM (its weights are not read here)
REAL_VISION = dataclasses.replace(config.PRESETS["d2vlm-3.8b"], vision_layers=1, qformer_layers=2, llm_width=64,
                                  llm_layers=2, llm_heads=4, llm_mlp=128, llm_vocab=1000, llm_max_positions=1024,
                                  inject_layer=1, lora_r=4, lora_alpha=8)


@pytest.fixture(scope="module")
def instructblip(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "instructblip-vicuna-7b"
    return path, layouts.instructblip_vicuna_7b(path)


def test_the_instructblip_fixture_has_the_real_layout(instructblip):
    path, _ = instructblip
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    shards = sorted(set(index.values()))
    assert len(shards) > 1 and all(s.startswith("model-") and s.endswith(f"-of-{len(shards):05d}.safetensors")
                                   for s in shards)
    with safe_open(str(path / index["qformer.embeddings.word_embeddings.weight"]), framework="pt") as f:
        emb = f.get_slice("qformer.embeddings.word_embeddings.weight")
        assert emb.get_shape() == [30523, 768] and emb.get_dtype() == "F32"
    with safe_open(str(path / index["vision_model.encoder.layers.0.self_attn.qkv.bias"]), framework="pt") as f:
        assert f.get_slice("vision_model.encoder.layers.0.self_attn.qkv.bias").get_shape() == [3 * 1408]
    assert any(k.startswith("language_model.") for k in index) and "query_tokens" in index


def test_instructblip_directory_loads_exactly(instructblip):
    path, ib = instructblip
    m = checkpoint.from_weights(REAL_VISION, vision_weights=path)
    torch.testing.assert_close(m.vision.state_dict(), ib.vision_model.state_dict(), rtol=0, atol=0)
    torch.testing.assert_close(m.qformer.state_dict(), ib.qformer.state_dict(), rtol=0, atol=0)
    torch.testing.assert_close(m.query_tokens.detach(), ib.query_tokens.detach(), rtol=0, atol=0)
    qtok = m.qformer_tokenizer
    assert len(qtok) == 30523 and qtok.convert_tokens_to_ids(layouts.DEC) == 30522 and qtok.truncation_side == "left"
    assert qtok("a red square", add_special_tokens=False)["input_ids"] == [1037, 2417, 2675]  # bert-base-uncased ids
    frames = torch.randn(1, 1, 3, 224, 224)
    ids = torch.tensor([qtok("find the red square", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        tokens = m.encode_video(frames, torch.ones(1, 1, dtype=torch.bool), ids, torch.ones_like(ids, dtype=torch.bool))
    assert tokens.shape == (1, 1, REAL_VISION.llm_width) and torch.isfinite(tokens).all()


def test_a_qformer_vocabulary_that_does_not_fit_names_the_tensor(instructblip):
    path, _ = instructblip
    bert_only = dataclasses.replace(REAL_VISION, qformer_vocab=30522)
    with pytest.raises(ValueError, match=r"the Q-Former tokenizer has 30523 tokens, more than qformer_vocab=30522"):
        checkpoint.from_weights(bert_only, vision_weights=path)
    wider = dataclasses.replace(REAL_VISION, qformer_vocab=30524)
    with pytest.raises(ValueError, match=r"instructblip-vicuna-7b: tensor qformer.embeddings.word_embeddings.weight "
                                         r"has shape \(30523, 768\), this model expects \(30524, 768\)"):
        checkpoint.from_weights(wider, vision_weights=path)
    deeper = dataclasses.replace(REAL_VISION, vision_layers=2)
    with pytest.raises(ValueError, match=r"tensor vision_model.encoder.layers.1.\S+ is missing"):
        checkpoint.from_weights(deeper, vision_weights=path)


def test_load_exactly_messages():
    lin = torch.nn.Linear(3, 2)
    checkpoint.load_exactly(lin, {"weight": torch.ones(2, 3), "bias": torch.zeros(2)}, "f", "p.")
    assert lin.weight.sum().item() == 6
    with pytest.raises(ValueError, match=r"f: tensor p.bias is missing \(1 in all\)"):
        checkpoint.load_exactly(lin, {"weight": torch.ones(2, 3)}, "f", "p.")
    with pytest.raises(ValueError, match=r"f: tensor p.extra has no place in this model"):
        checkpoint.load_exactly(lin, {"weight": torch.ones(2, 3), "bias": torch.zeros(2), "extra": torch.ones(1)}, "f", "p.")
    with pytest.raises(ValueError, match=r"f: tensor p.weight has shape \(3, 2\), this model expects \(2, 3\)"):
        checkpoint.load_exactly(lin, {"weight": torch.ones(3, 2), "bias": torch.zeros(2)}, "f", "p.")
