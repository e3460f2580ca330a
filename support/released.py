"""The released checkpoints' layout: E.T.Chat (PolyU-ChenLab/ETChat-Phi3-Mini-Stage-2, the paper's
starting point) and D2VLM (wenzhengzeng/D2VLM-Models). docs/release.md#released-checkpoints and
docs/release.md#parameter-names-and-transforms.

    is_released(dir)                  a directory in that layout (not one of our checkpoints)
    config_from(dir, base)            a D2VLMConfig with the widths, depths and vocabularies the directory holds
    load(dir, cfg, qformer_tokenizer) our D2VLM with its weights: E.T.Chat stage 2 (frm_head, evi_head fresh)
                                      or released D2VLM; LoRA always fresh (the release is merged)
    export(model, out, dtype)         ours -> one self-contained directory in that layout, LoRA merged
                                      (the command: python checkpoint.py export; checkpoint.py reads either
                                      kind of directory, this module reads only the released one)

The layout: a full merged model (no adapter) in upstream's names, sharded safetensors +
model.safetensors.index.json, config.json (model_type etchat_phi3: Phi-3's fields and E.T.Chat's),
the Phi-3 tokenizer with <evi> = 32011 and </evi> = 32012 (D2VLM), no Q-Former tokenizer (upstream
builds bert-base-uncased + [DEC] in code; our exports carry it in qformer_tokenizer/). Names map by
prefix (RENAMES); two tensors change form: LAVIS's q_bias / v_bias are HF's one qkv.bias = (q, 0, v),
and the position_ids buffer of the Q-Former and E.T.Chat stage 3's vid_head are dropped.
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import torch

from config import PRESETS, D2VLMConfig
from data import DEC
from evidence import EVI, EVI_END
from model import D2VLM, add_special_tokens, build_model
from support.files import (QFORMER_TOKENIZER, WEIGHTS, atomic_path, check_exactly, read_json, read_tokenizer,
                           safetensors_file, weight_map)

MODEL_TYPE = "etchat_phi3"
INDEX = "model.safetensors.index.json"
# upstream's <evi> / </evi> ids: appended to E.T.Chat's 32011-entry tokenizer (Phi-3's 32000 + 11 added),
# inside Phi-3's 32064 embedding rows (no resize)
EVIDENCE_IDS = {EVI: 32011, EVI_END: 32012}
PHI3_ROWS = 32064
SHARD_BYTES = 4 * 2**30  # about the size of a transformers shard (safetensors, 5 GB limit)
_EVA, _BERT = "model.vision_tower.vision_tower.", "model.qformer_bert.bert."
# (upstream prefix, our prefix): the rest of the name is kept; {} is a layer number; first match wins
RENAMES = [
    (_EVA + "cls_token", "vision.embeddings.class_embedding"),
    (_EVA + "pos_embed", "vision.embeddings.position_embedding"),
    (_EVA + "patch_embed.proj.", "vision.embeddings.patch_embedding."),
    (_EVA + "blocks.{}.norm1.", "vision.encoder.layers.{}.layer_norm1."),
    (_EVA + "blocks.{}.norm2.", "vision.encoder.layers.{}.layer_norm2."),
    (_EVA + "blocks.{}.attn.qkv.weight", "vision.encoder.layers.{}.self_attn.qkv.weight"),
    (_EVA + "blocks.{}.attn.proj.", "vision.encoder.layers.{}.self_attn.projection."),
    (_EVA + "blocks.{}.mlp.", "vision.encoder.layers.{}.mlp."),
    ("model.qformer_ln.", "vision.post_layernorm."),
    (_BERT + "embeddings.LayerNorm.", "qformer.embeddings.layernorm."),
    (_BERT + "embeddings.", "qformer.embeddings."),
    (_BERT + "encoder.layer.{}.attention.self.", "qformer.encoder.layer.{}.attention.attention."),
    (_BERT + "encoder.layer.{}.crossattention.self.", "qformer.encoder.layer.{}.crossattention.attention."),
    (_BERT + "encoder.", "qformer.encoder."),
    ("model.qformer_query", "query_tokens"),
    ("model.qformer_proj.", "aggregator.up."),
    ("model.qformer_q_proj.", "aggregator.q."),
    ("model.qformer_k_proj.", "aggregator.k."),
    ("model.qformer_v_proj.", "aggregator.out."),
    ("frm_head.", "frm_head."),
    ("evi_head.", "evi_head."),
    ("model.", "llm.base_model.model.model."),
    ("lm_head.", "llm.base_model.model.lm_head."),
]
DROPPED = (_BERT + "embeddings.position_ids", "vid_head.")  # upstream tensors with no place here
_QV_BIAS = re.compile(re.escape(_EVA) + r"blocks\.(\d+)\.attn\.([qv])_bias$")
_QKV_BIAS = re.compile(r"vision\.encoder\.layers\.(\d+)\.self_attn\.qkv\.bias$")
HEADS = ("frm_head.", "evi_head.")  # D2VLM's, absent from E.T.Chat: fresh when starting from it


def _pattern(prefix):
    exact = not prefix.endswith(".")
    return re.compile(re.escape(prefix).replace(r"\{\}", r"(\d+)") + ("$" if exact else ""))


_UP = [(_pattern(a), b) for a, b in RENAMES]
_DOWN = [(_pattern(b), a) for a, b in RENAMES]


def _rename(name, rules):
    for pat, to in rules:
        m = pat.match(name)
        if m:
            return to.format(*m.groups()) + name[m.end():]
    return None


def our_name(name: str) -> str | None:
    """Upstream tensor name -> ours (the LLM's without peft's base_layer; None for DROPPED)."""
    if name.startswith(DROPPED):
        return None
    m = _QV_BIAS.match(name)
    if m:
        return f"vision.encoder.layers.{m.group(1)}.self_attn.qkv.bias"
    out = _rename(name, _UP)
    if out is None:
        raise KeyError(name)
    return out


def upstream_name(name: str) -> str:
    """Our tensor name (without base_layer) -> upstream's (the qkv bias: see export)."""
    out = _rename(name.replace(".base_layer.", "."), _DOWN)
    if out is None:
        raise KeyError(name)
    return out


# ---------------------------------------------------------------------------------------------
# Reading

def is_released(directory) -> bool:
    """True for a directory in the released layout (config.json of model_type etchat_phi3)."""
    f = Path(directory) / "config.json"
    if not f.is_file():
        return False
    try:
        doc = read_json(f)
    except ValueError:  # not JSON: not ours to read (from_checkpoint then names the problem)
        return False
    return isinstance(doc, dict) and doc.get("model_type") == MODEL_TYPE


def _shards(d: Path) -> list:
    if (d / INDEX).is_file():
        return sorted(set(weight_map(d / INDEX).values()))
    if (d / WEIGHTS).is_file():
        return [WEIGHTS]
    raise FileNotFoundError(f"{d}: no {INDEX} or {WEIGHTS}")


def _shapes(d: Path) -> dict:
    """{upstream name: shape} of every tensor in the directory, read from the headers only."""
    out = {}
    for shard in _shards(d):
        if not (d / shard).is_file():
            raise FileNotFoundError(f"{d / shard}: shard named in {INDEX} not found")
        with safetensors_file(d / shard) as f:
            out.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
    return out


# config.json fields config_from reads, each a positive integer (rope_theta, alpha: positive numbers if given)
_UPSTREAM_SIZES = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
                   "max_position_embeddings")


def _read_config(d: Path) -> dict:
    f = d / "config.json"
    cfg = read_json(f)
    if not isinstance(cfg, dict) or cfg.get("model_type") != MODEL_TYPE:
        got = cfg.get("model_type") if isinstance(cfg, dict) else type(cfg).__name__
        raise ValueError(f"{f}: model_type {got!r}, expected {MODEL_TYPE!r}")
    for k in _UPSTREAM_SIZES:
        if type(cfg.get(k)) is not int or cfg[k] <= 0:
            raise ValueError(f"{f}: field '{k}' must be a positive integer, got {cfg.get(k)!r:.60}")
    for k in ("rope_theta", "alpha"):
        if k in cfg and (type(cfg[k]) not in (int, float) or not 0 < cfg[k] < float("inf")):
            raise ValueError(f"{f}: field '{k}' must be a positive number, got {cfg[k]!r:.60}")
    return cfg


def config_from(directory, base: D2VLMConfig | None = None) -> D2VLMConfig:
    """`base` (default: the d2vlm-3.8b preset; our exports: the config they were trained with) with
    every width, depth and vocabulary the directory determines: the LLM's from config.json, the
    rest from the tensor shapes. Head counts are not visible in the weights and stay `base`'s."""
    d = Path(directory)
    up = _read_config(d)
    if base is None:
        base = (D2VLMConfig.from_dict(up["d2vlm_config"], f"{d / 'config.json'}: d2vlm_config") if "d2vlm_config" in up
                else PRESETS["d2vlm-3.8b"])
    if up.get("num_key_value_heads", up["num_attention_heads"]) != up["num_attention_heads"]:
        raise ValueError(f"{d / 'config.json'}: num_key_value_heads differs from num_attention_heads; Phi-3-mini has none")
    if up.get("rope_scaling"):
        raise ValueError(f"{d / 'config.json'}: rope_scaling {up['rope_scaling']!r}; only Phi-3-mini-4k's plain RoPE is supported")
    s = _shapes(d)

    def shape(name):
        if name not in s:
            raise ValueError(f"{d}: tensor {name} is missing")
        return s[name]

    def layers(pattern):
        return len({m.group(1) for k in s for m in [re.match(pattern, k)] if m})
    pos = shape(_EVA + "pos_embed")
    patch = shape(_EVA + "patch_embed.proj.weight")[-1]
    cross = sorted({int(m.group(1)) for k in s for m in [re.match(re.escape(_BERT) + r"encoder\.layer\.(\d+)\.crossattention\.", k)] if m})
    every = cross[1] - cross[0] if len(cross) > 1 else base.qformer_cross_every
    words = shape(_BERT + "embeddings.word_embeddings.weight")
    return dataclasses.replace(
        base, vision_width=pos[-1], patch_size=patch, image_size=patch * round((pos[1] - 1) ** 0.5),
        vision_layers=layers(re.escape(_EVA) + r"blocks\.(\d+)\."), vision_mlp=shape(_EVA + "blocks.0.mlp.fc1.weight")[0],
        qformer_width=words[1], qformer_vocab=words[0], qformer_layers=layers(re.escape(_BERT) + r"encoder\.layer\.(\d+)\."),
        qformer_mlp=shape(_BERT + "encoder.layer.0.intermediate.dense.weight")[0], qformer_cross_every=every,
        num_query_tokens=shape("model.qformer_query")[1], llm_width=up["hidden_size"], llm_layers=up["num_hidden_layers"],
        llm_heads=up["num_attention_heads"], llm_mlp=up["intermediate_size"], llm_vocab=up["vocab_size"],
        llm_max_positions=up["max_position_embeddings"], rope_theta=float(up.get("rope_theta", base.rope_theta)),
        alpha=float(up.get("alpha", base.alpha)))


def qformer_tokenizer_from(directory):
    """A Q-Former tokenizer directory (bert-base-uncased, or InstructBLIP's qformer_tokenizer/) as
    InstructBLIP uses it: [DEC] as bos (added when missing), truncation on the left."""
    tok = read_tokenizer(directory, "Q-Former tokenizer directory", truncation_side="left")
    if DEC not in tok.get_vocab():
        tok.add_special_tokens({"bos_token": DEC})
    return tok


def tokenizer_of(directory):
    """The LLM tokenizer of a released directory, as load() builds the model with it (<evi>, </evi>,
    <video> added where it lacks them)."""
    from transformers import PretrainedConfig
    tok = read_tokenizer(directory, "released directory's tokenizer", config=PretrainedConfig())  # not config.json's type
    return add_special_tokens(tok)


def load(directory, cfg: D2VLMConfig | None = None, qformer_tokenizer=None, tokenizer=None):
    """Our D2VLM holding a released directory's weights. cfg: the config to build (default:
    config_from(directory)); its widths must fit the tensors (an error names the tensor). The
    Q-Former tokenizer comes from `qformer_tokenizer` (a directory) or the directory's own
    qformer_tokenizer/; the LLM's is tokenizer_of(directory) (`tokenizer`: the one it gave). Returns
    (model, fresh): fresh names the parts not in the directory (frm_head / evi_head when it is
    E.T.Chat's); the LoRA adapter is always fresh (B = 0)."""
    d = Path(directory)
    up = _read_config(d)
    cfg = cfg or config_from(d)
    qdir = Path(qformer_tokenizer) if qformer_tokenizer else d / QFORMER_TOKENIZER
    if not qdir.is_dir():
        raise FileNotFoundError(f"{d}: holds no Q-Former tokenizer (upstream builds bert-base-uncased + [DEC] in code); "
                                "give --qformer-tokenizer DIR (bert-base-uncased, or an InstructBLIP directory's "
                                "qformer_tokenizer/)")
    tok = tokenizer if tokenizer is not None else tokenizer_of(d)
    qtok = (qformer_tokenizer_from(qdir) if qformer_tokenizer  # a user's bert-base-uncased; our exports carry the exact one
            else read_tokenizer(qdir, "Q-Former tokenizer directory"))
    with torch.device("meta"):  # shapes only: a layout that does not fit fails before any memory is spent
        skeleton = build_model(cfg, tok, qtok)
    for key, token in (("evidence_token_id", EVI), ("evidence_end_token_id", EVI_END)):
        want = up.get(key, EVIDENCE_IDS[token] if cfg.llm_vocab == PHI3_ROWS else None)
        if want is not None and skeleton.token_id[token] != want:
            raise ValueError(f"{d}: the tokenizer gives {token} the id {skeleton.token_id[token]}, the weights use {want} "
                             f"({key}); a tokenizer with other added tokens does not fit these weights")
    own = skeleton.state_dict()
    shapes = _shapes(d)
    plan, given = {}, {}  # upstream name -> ours; our name -> shape
    for k, shape in shapes.items():
        try:
            ours = our_name(k)
        except KeyError:
            raise ValueError(f"{d}: tensor {k} has no place in this model") from None
        if ours is None:
            continue
        wrapped = ours.replace(".weight", ".base_layer.weight")  # peft wraps the LoRA targets
        plan[k] = ours = wrapped if ours not in own and wrapped in own else ours
        given[ours] = (given[ours][0] * 3,) if ours in given else shape  # q_bias + v_bias -> (q, 0, v)
    for k, ours in plan.items():
        m = _QV_BIAS.match(k)
        other = m and k[:-len("q_bias")] + ("v_bias" if m.group(2) == "q" else "q_bias")
        if m and other not in plan:
            raise ValueError(f"{d}: tensor {other} is missing")
    fresh = [h for h in HEADS if not any(o.startswith(h) for o in given)]
    expected = {k: tuple(t.shape) for k, t in own.items() if "lora_" not in k and not k.startswith(tuple(fresh))}
    shown = {o: k for k, o in plan.items()}
    check_exactly(expected, given, d, lambda k: shown.get(k) or upstream_name(k))
    model = build_model(cfg, tok, qtok)
    own = model.state_dict()
    halves = {}
    with torch.no_grad():
        for shard in _shards(d):
            with safetensors_file(d / shard) as f:
                for k in f.keys():
                    if k not in plan:
                        continue
                    ours, t = plan[k], f.get_tensor(k)
                    if _QKV_BIAS.match(ours):
                        halves.setdefault(ours, {})[_QV_BIAS.match(k).group(2)] = t
                        if len(halves[ours]) < 2:
                            continue
                        h = halves.pop(ours)
                        t = torch.cat([h["q"], torch.zeros_like(h["q"]), h["v"]])
                    own[ours].copy_(t)
    return model, [h.rstrip(".") for h in fresh]


# ---------------------------------------------------------------------------------------------
# Writing

def merged_tensors(model: D2VLM) -> dict:
    """Every tensor of `model` under our names without peft's wrapping, the LoRA update (B A times
    its scale) merged into each weight it adapts, in fp32."""
    modules = dict(model.named_modules())
    out = {}
    for name, t in model.state_dict().items():
        if "lora_" in name:
            continue
        t = t.detach().float()
        if ".base_layer." in name:
            layer = modules[name.split(".base_layer.")[0]]
            if name.endswith(".weight"):
                for adapter in layer.active_adapters:
                    t = t + layer.get_delta_weight(adapter).float()
            name = name.replace(".base_layer.", ".")
        out[name] = t
    return out


def released_tensors(model: D2VLM) -> dict:
    """{upstream name: tensor}: the model in the released layout, LoRA merged, in fp32 (position_ids: int64)."""
    out = {}
    for name, t in merged_tensors(model).items():
        if name == "qformer.embeddings.position_embeddings.weight":  # upstream keeps position_ids as a buffer
            out[_BERT + "embeddings.position_ids"] = torch.arange(t.shape[0])[None]
        m = _QKV_BIAS.match(name)
        if m is None:
            out[upstream_name(name)] = t
            continue
        w = t.shape[0] // 3
        if t[w:2 * w].any():
            raise ValueError(f"tensor {name}: its k slice is not zero, and the released layout has no k bias (q_bias, v_bias)")
        pre = f"{_EVA}blocks.{m.group(1)}.attn."
        out[pre + "q_bias"], out[pre + "v_bias"] = t[:w].clone(), t[2 * w:].clone()
    return out


def released_config(model: D2VLM, dtype: torch.dtype) -> dict:
    """config.json of the released layout: Phi-3's fields as transformers 4.44 names them, E.T.Chat's
    and D2VLM's own (the <evi> ids), and ours under d2vlm_config (read back by config_from)."""
    c, llm = model.cfg, model.llm.get_base_model().config
    return {"architectures": ["ETChatPhi3ForCausalLM"], "model_type": MODEL_TYPE,
            "vocab_size": model.lm_head.weight.shape[0], "hidden_size": c.llm_width, "intermediate_size": c.llm_mlp,
            "num_hidden_layers": c.llm_layers, "num_attention_heads": c.llm_heads, "num_key_value_heads": c.llm_heads,
            "hidden_act": llm.hidden_act, "max_position_embeddings": c.llm_max_positions,
            "original_max_position_embeddings": c.llm_max_positions, "rms_norm_eps": llm.rms_norm_eps,
            "rope_theta": c.rope_theta, "rope_scaling": None,
            "sliding_window": c.max_len,  # as upstream sets it (model_max_length); no window is applied
            "bos_token_id": model.tokenizer.bos_token_id, "eos_token_id": model.tokenizer.eos_token_id,
            "pad_token_id": model.tokenizer.pad_token_id, "tie_word_embeddings": False,
            "torch_dtype": str(dtype).removeprefix("torch."), "conv_type": "phi3", "mm_projector": "qformer",
            "bi_attention": True, "alpha": c.alpha, "load_base_models": False, "use_evidence": True,
            "evidence_token_id": model.token_id[EVI], "evidence_end_token_id": model.token_id[EVI_END],
            "d2vlm_config": dataclasses.asdict(c)}


def export(model: D2VLM, out, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write `model` to the directory `out` (written under a temporary name, then renamed) in the
    released layout, LoRA merged, tensors in `dtype` (the release: bfloat16): shards of at most
    SHARD_BYTES + index, config.json, the tokenizer, qformer_tokenizer/. load() reads it back
    without any other weight directory."""
    from safetensors.torch import save_file
    tensors = {k: (t.to(dtype) if t.is_floating_point() else t).contiguous() for k, t in released_tensors(model).items()}
    shards, size = [[]], 0
    for k, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += n
    out = Path(out)
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        names = ([WEIGHTS] if len(shards) == 1 else
                 [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
        for name, keys in zip(names, shards):
            save_file({k: tensors[k] for k in keys}, str(tmp / name), metadata={"format": "pt"})
        if len(shards) > 1:
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            (tmp / INDEX).write_text(json.dumps({"metadata": {"total_size": total},
                                                 "weight_map": {k: n for n, ks in zip(names, shards) for k in ks}}, indent=2))
        (tmp / "config.json").write_text(json.dumps(released_config(model, dtype), indent=2))
        model.tokenizer.save_pretrained(tmp)
        model.qformer_tokenizer.save_pretrained(tmp / QFORMER_TOKENIZER)
    return out
