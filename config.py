"""Every number of D2VLM in one dataclass, and the presets. Where they come from: docs/design.md#model
and docs/design.md#evidence-tokens (architecture), docs/design.md#sft-objective and
docs/design.md#fpo (losses), docs/design.md#training-recipe (training).

    D2VLMConfig            the fields, grouped: vision, Q-Former, LLM, evidence tokens, LoRA, losses,
                           FPO, training, data; to_json / from_dict (checkpoints hold it as config.json)
    PRESETS                "d2vlm-3.8b" (the paper's model), "tiny" (the embedded default, trains on a
                           CPU in minutes), "mid" (between the two, for CPU speed figures)

    configure(cfg, ["FIELD=VALUE", ...])   what `--set` does (train.py, evaluate.py): every field is reachable,
                                          and the result is checked (check: finite, in RANGES; check_size: the
                                          model fits this machine's memory) before anything starts
    D2VLMConfig.from_dict(d, where)        a saved config, every field checked the same way
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import asdict, dataclass

from support.files import is_number, show


@dataclass
class D2VLMConfig:
    # vision: EVA ViT-G/14 as transformers' InstructBlipVisionModel (39 of EVA's 40 layers)
    image_size: int = 224
    patch_size: int = 14
    vision_width: int = 1408
    vision_layers: int = 39
    vision_heads: int = 16
    vision_mlp: int = 6144
    init_range: float = 0.02  # InstructBlipVisionConfig defaults to 1e-10: a dead random ViT
    # Q-Former (BERT-base with cross-attention every 2nd layer) and our query tokens
    qformer_width: int = 768
    qformer_layers: int = 12
    qformer_heads: int = 12
    qformer_mlp: int = 3072
    qformer_cross_every: int = 2
    qformer_vocab: int = 30523  # BERT's 30522 + InstructBLIP's [DEC]
    qformer_ln_eps: float = 1e-5  # the LayerNorm between the ViT and the Q-Former (LAVIS's ln_vision)
    qformer_max_text: int = 256  # instruction tokens (left-truncated)
    qformer_special_tokens: bool = False  # [CLS] ... [SEP] around the instruction, as the release tokenizes it
    qformer_dropout: float = 0.1  # BERT's hidden and attention dropout, as InstructBLIP trains it
    num_query_tokens: int = 32
    # LLM: Phi-3-mini-4k-instruct
    llm_width: int = 3072
    llm_layers: int = 32
    llm_heads: int = 32
    llm_mlp: int = 8192
    llm_vocab: int = 32064
    llm_max_positions: int = 4096
    rope_theta: float = 10000.0
    # evidence tokens
    inject_layer: int = 6      # hidden_states[6]: layer-6 video states are added to <evi> embeddings
    match_layer: int = -2      # hidden_states[-2]: what frm_head / evi_head read
    select_ratio: float = 0.6  # frames with p >= select_ratio * max p form the candidate runs (select_interval)
    alpha: float = 2.0         # soft targets alpha^-distance
    semantic_capture: bool = True  # answer <evi> take in their span's video states (False: ablation B2;
                                   # question <evi> keep theirs, they come from the question's times)
    # the paper's ablations (data.arrange, losses.py, decoding.py; README "Ablations")
    response_format: str = "factorized"  # RESPONSE_FORMATS: "factorized" (K <evi>, </evi>, the answer with
                                         # its <evi>), "coupled" (A1: the answer alone, one <evi> per event),
                                         # "factorized_text" (A2: stage 1 as factorized, the answer's times as text)
    evidence_level: str = "event"  # EVIDENCE_LEVELS: "event" (one <evi> per event, a span of frames) or
                                   # "frame" (B1: one <evi> per boundary, a softmax over frames, one frame each)
    # LoRA on the LLM
    lora_r: int = 128
    lora_alpha: int = 256
    lora_dropout: float = 0.05
    lora_targets: tuple = ("qkv_proj", "o_proj")
    # False: the ViT, the Q-Former's non-attention weights and the LLM's base weights stay frozen, as
    # upstream fine-tunes pretrained parts. True trains them too: for random weights (no pretraining)
    train_base: bool = False
    # loss weights (losses.py); 0 switches a term off
    w_sft: float = 1.0
    w_gnd: float = 10.0
    w_cons: float = 10.0
    # FPO (fpo.py): L = the SFT objective on the chosen response + w_fpo * L_FPO
    beta: float = 0.1
    w_fpo: float = 1.0
    # the miniature's starting point (pretrain.py; train.py --stage pretrain): phase 1, the image-text
    # contrastive alignment of the encoder (batch of frames, passes, learning rate, projection width, temperature)
    itc_batch: int = 64
    itc_epochs: float = 1.0
    itc_lr: float = 1e-3
    itc_dim: int = 32
    itc_temperature: float = 0.07
    itm: bool = True  # and BLIP-2's image-text matching, the Q-Former reading an instruction with the frame
    pretrain_epochs: float = 1.0  # phase 2 (captions and questions): passes over the pretraining records
    # training (train.py; docs/design.md#training-recipe): AdamW, two learning rates, cosine with warm-up
    lr_lora: float = 5e-5
    lr_other: float = 2e-5
    weight_decay: float = 0.0
    warmup: float = 0.03       # fraction of the steps
    grad_clip: float = 1.0
    batch_size: int = 1        # per process
    grad_accum: int = 1
    epochs: int = 1
    fpo_epochs: float = 1.0    # the FPO stage's length in passes over the pairs (a fraction: a seeded subset)
    fpo_lr_scale: float = 1.0  # the FPO stage's learning rates are lr_lora and lr_other times this
    fpo_start: str = "continue"  # "continue": train the SFT LoRA on; "merged": as released, the SFT LoRA
                                 # merged into the LLM and a fresh LoRA (lora_r, lora_alpha, lora_dropout) trained
    fpo_dropout: bool = False    # dropout during FPO: off as TRL's DPO (policy = reference net); on as released
    # data
    fps: float = 1.0
    max_len: int = 2048
    # the LLM's prefix and suffix columns rounded up to a multiple of this: on a GPU a new sequence shape
    # costs a new kernel plan, so few distinct shapes run faster; on a CPU padding is only more work
    seq_multiple: int = 1
    # training-data filters, 0 = none (ours); the release: 5, 350 and 200 (batches.filter_records)
    min_duration: float = 0.0    # seconds of video at least
    max_duration: float = 0.0    # seconds of video at most
    max_answer_words: int = 0    # words of the answer at most, split on spaces as the release splits them
    system_prompt: str = "You are a helpful AI assistant."
    # the prompt tokenized as released: split at the video, each piece with the tokenizer's default special
    # tokens, the first piece's leading ones kept (Phi-3: one <s>; the text after the video a new piece)
    prompt_as_released: bool = False
    tiny_vocab: int = 1000  # size of the in-code BPE tokenizer used when no LLM weights are given

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_dict(cls, d, where="config") -> "D2VLMConfig":
        """The config of a dict (what to_json wrote, or a released directory's d2vlm_config): every
        key a field, every value of its field's type, the result checked (check, check_size).
        ValueError naming `where` and the field otherwise. Fields it lacks keep their defaults."""
        if not isinstance(d, dict):
            raise ValueError(f"{where}: expected a JSON object of D2VLMConfig fields, got {type(d).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        out = {}
        for k, v in d.items():
            if k not in fields:
                raise ValueError(f"{where}: field '{k}' is not a D2VLMConfig field (a config of another version?)")
            kind = type(fields[k].default)
            if kind is tuple:
                if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
                    raise ValueError(f"{where}: field '{k}' must be a list of names, got {show(v)}")
                v = tuple(v)
            elif kind is float and type(v) is int:
                v = float(v)
            elif type(v) is not kind:
                raise ValueError(f"{where}: field '{k}' must be of type {kind.__name__}, got {show(v)}")
            out[k] = v
        cfg = cls(**out)
        problem = check(cfg) or check_size(cfg)
        if problem:
            raise ValueError(f"{where}: {problem}")
        return cfg


def configure(cfg: D2VLMConfig, overrides) -> D2VLMConfig:
    """cfg with FIELD=VALUE overrides, each parsed as its field's type."""
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    changes = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            raise SystemExit(f"--set {item}: expected FIELD=VALUE with FIELD one of D2VLMConfig's fields")
        kind = type(getattr(cfg, key))
        if kind is bool:
            if value.lower() not in ("true", "false", "1", "0"):
                raise SystemExit(f"--set {item}: {key} takes true or false")
            changes[key] = value.lower() in ("true", "1")
        elif kind in (int, float, str):
            try:
                changes[key] = kind(value)
            except (ValueError, OverflowError):
                raise SystemExit(f"--set {item}: {key} must be of type {kind.__name__}") from None
        else:
            raise SystemExit(f"--set {item}: {key} cannot be set from the command line")
    out = dataclasses.replace(cfg, **changes)
    problem = check(out) or check_size(out)
    if problem:
        raise SystemExit(f"--set: {problem}" if any(problem.startswith(k + "=") for k in changes) else problem)
    return out


FPO_STARTS = ("continue", "merged")
ADAPTER_SHAPE = ("lora_r", "lora_targets")  # what a saved LoRA adapter's tensors fix
SHOWN = 40  # characters of a bad setting or flag value quoted in its one-line error (support/cli.py's too)
RESPONSE_FORMATS = ("factorized", "coupled", "factorized_text")
EVIDENCE_LEVELS = ("event", "frame")
# the allowed range of each numeric field: (low, high, low included, high included); None = unbounded
_POSITIVE, _NON_NEGATIVE, _FRACTION = (0, None, False, False), (0, None, True, False), (0, 1, True, False)
RANGES = {
    **dict.fromkeys(("image_size", "patch_size", "vision_width", "vision_layers", "vision_heads", "vision_mlp",
                     "qformer_width", "qformer_layers", "qformer_heads", "qformer_mlp", "qformer_cross_every",
                     "qformer_vocab", "qformer_max_text", "num_query_tokens", "llm_width", "llm_layers", "llm_heads",
                     "llm_mlp", "llm_vocab", "llm_max_positions", "lora_r", "lora_alpha", "batch_size", "grad_accum",
                     "epochs", "max_len", "tiny_vocab", "init_range", "qformer_ln_eps", "rope_theta", "beta",
                     "grad_clip", "fpo_epochs", "itc_batch", "itc_epochs", "itc_lr", "itc_dim",
                     "itc_temperature", "seq_multiple"), _POSITIVE),
    **dict.fromkeys(("w_sft", "w_gnd", "w_cons", "w_fpo", "lr_lora", "lr_other", "weight_decay", "fpo_lr_scale",
                     "min_duration", "max_duration", "max_answer_words", "pretrain_epochs"), _NON_NEGATIVE),
    **dict.fromkeys(("qformer_dropout", "lora_dropout", "warmup"), _FRACTION),
    "select_ratio": (0, 1, False, True),
    "alpha": (1, None, False, False),  # soft targets alpha^-distance must fall with the distance
    # frames per second: from one a minute (below it most events of E.T.Bench fall between two frames) to
    # 60 (the frame rate of most video; sampling above it repeats frames)
    "fps": (1 / 60, 60, True, True),
}


def check(cfg: D2VLMConfig) -> str | None:
    """The first problem with cfg's values, as one line naming the field, or None: every number
    finite and in its RANGES, the image a whole number of patches, each width a multiple of its heads."""
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if f.name not in RANGES:
            continue
        lo, hi, lo_in, hi_in = RANGES[f.name]
        if not is_number(v) or (lo is not None and (v < lo or (v == lo and not lo_in))) \
                or (hi is not None and (v > hi or (v == hi and not hi_in))):
            span = f"{'[' if lo_in else '('}{lo:g}, {'∞)' if hi is None else f'{hi:g}' + (']' if hi_in else ')')}"
            return f"{f.name}={show(v, SHOWN)} is outside {span}"
    for field, allowed in (("fpo_start", FPO_STARTS), ("response_format", RESPONSE_FORMATS),
                           ("evidence_level", EVIDENCE_LEVELS)):
        if getattr(cfg, field) not in allowed:
            return f"{field}={getattr(cfg, field)!r} is not one of {', '.join(allowed)}"
    if cfg.image_size % cfg.patch_size:
        return f"image_size={cfg.image_size} is not a multiple of patch_size={cfg.patch_size}"
    for width, heads in (("vision_width", "vision_heads"), ("qformer_width", "qformer_heads"), ("llm_width", "llm_heads")):
        if getattr(cfg, width) % getattr(cfg, heads):
            return f"{width}={getattr(cfg, width)} is not a multiple of {heads}={getattr(cfg, heads)}"
    for field in ("inject_layer", "match_layer"):  # indices into hidden_states: embeddings, then each layer
        if not -(cfg.llm_layers + 1) <= getattr(cfg, field) <= cfg.llm_layers:
            return (f"{field}={getattr(cfg, field)} is not a hidden state of a {cfg.llm_layers}-layer LLM "
                    f"(0 to {cfg.llm_layers}, or negative from the end)")
    return None


def parameter_count(cfg: D2VLMConfig) -> int:
    """About how many parameters the model of cfg has (weight matrices and embeddings; biases, norms
    and LoRA left out): ViT, Q-Former (its cross-attention reads the ViT width), aggregator, Phi-3
    (input and output embeddings), the two heads. d2vlm-3.8b: 5.1 billion."""
    v, q, l = cfg.vision_width, cfg.qformer_width, cfg.llm_width
    vit = cfg.vision_layers * (4 * v * v + 2 * v * cfg.vision_mlp) + (3 * cfg.patch_size ** 2 + (cfg.image_size // cfg.patch_size) ** 2) * v
    cross = cfg.qformer_layers // cfg.qformer_cross_every * (2 * q * q + 2 * q * v)
    qformer = cfg.qformer_layers * (4 * q * q + 2 * q * cfg.qformer_mlp) + cross + cfg.qformer_vocab * q
    llm = cfg.llm_layers * (4 * l * l + 3 * l * cfg.llm_mlp) + 2 * cfg.llm_vocab * l
    return vit + qformer + 4 * v * v + v * l + llm + 2 * l * l


def memory_bytes() -> int:
    """This machine's memory: physical plus swap, in bytes (what the largest allocation can reach)."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        with open("/proc/meminfo") as f:
            swap = next((int(x.split()[1]) * 1024 for x in f if x.startswith("SwapTotal:")), 0)
    except OSError:
        swap = 0
    return total + swap


def check_size(cfg: D2VLMConfig) -> str | None:
    """A line saying why the model of cfg cannot be built on this machine (its fp32 weights, as the
    model is built, exceed the memory: absurd widths or depths), or None."""
    n = parameter_count(cfg)
    need, have = 4 * n, memory_bytes()
    if need <= have:
        return None
    return (f"the model of these widths and depths has about {n:.3g} parameters ({need / 2**30:,.0f} GiB in fp32), "
            f"more than this machine's {have / 2**30:,.0f} GiB of memory (vision {cfg.vision_width} x "
            f"{cfg.vision_layers}, Q-Former {cfg.qformer_width} x {cfg.qformer_layers}, LLM {cfg.llm_width} x "
            f"{cfg.llm_layers}, vocabulary {cfg.llm_vocab})")


PRESETS = {
    # the real weights were trained with the Q-Former's special tokens; the real size runs on GPUs
    "d2vlm-3.8b": D2VLMConfig(qformer_special_tokens=True, seq_multiple=64),
    "tiny": D2VLMConfig(image_size=112, patch_size=16, vision_width=96, vision_layers=2, vision_heads=4,
                        vision_mlp=192, qformer_width=64, qformer_layers=2, qformer_heads=4, qformer_mlp=128,
                        qformer_max_text=96, num_query_tokens=8, llm_width=128, llm_layers=4, llm_heads=4,
                        llm_mlp=256, llm_vocab=1000, llm_max_positions=1024, inject_layer=2, lora_r=16,
                        lora_alpha=32, lora_dropout=0.0, max_len=512, tiny_vocab=1000, qformer_vocab=1000,
                        # from scratch, so far larger steps than a LoRA fine-tune of pretrained weights,
                        # and two passes over the 200 synthetic videos (one leaves the grounding half-learnt)
                        lr_lora=3e-3, lr_other=3e-3, batch_size=4, epochs=2, fpo_epochs=0.5, fpo_lr_scale=0.3,
                        # the starting point (train.py --stage pretrain): three passes of the encoder's
                        # alignment over the clips' frames; no captions-and-questions phase (it lowered
                        # every grounding score: docs/training.md)
                        itc_epochs=3.0, itc_lr=3e-3, pretrain_epochs=0.0),
    # between the two, for speed figures on a CPU (bench.py): LLM cost no longer hidden by overheads
    "mid": D2VLMConfig(image_size=112, patch_size=14, vision_width=384, vision_layers=4, vision_heads=6,
                       vision_mlp=1536, qformer_width=384, qformer_layers=4, qformer_heads=6, qformer_mlp=1536,
                       qformer_max_text=128, num_query_tokens=16, llm_width=768, llm_layers=8, llm_heads=12,
                       llm_mlp=2048, llm_max_positions=2048, inject_layer=2, lora_r=64, lora_alpha=128,
                       max_len=1024, tiny_vocab=1000, qformer_vocab=1000, lr_lora=1e-3, lr_other=1e-3, batch_size=4),
}
