"""The D2VLM model: EVA ViT-G/14 -> Q-Former -> one token per frame -> Phi-3 with <evi> tokens.

Paper: "Overall Architecture" and "Evidence Token". DESIGN.md §2-§3.

    D2VLMConfig, PRESETS      every number of the model; presets "d2vlm-3.8b", "tiny", "mid"
    build_model(cfg, ...)     vision + Q-Former (+ local InstructBLIP weights), Phi-3 + LoRA (+ local weights)
    D2VLM.forward(batch)      training forward: logits, <evi>-frame similarity logits, evi_head features
    generate(model, batch)    batched decoding with a KV cache and evidence injection

How one sequence runs through the LLM. The user turn holds one video placeholder; it becomes T video
tokens, with bidirectional attention among them and causal attention everywhere else (one explicit
4-D mask, SDPA). The video states depend only on what comes before them (the prefix), so the LLM
runs the prefix once with a cache (pass 1), we read the layer-`inject_layer` video states off it,
add their span means to the answer <evi> embeddings, and run the rest (pass 2) on the cache: one
LLM forward in all, no second run.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
from transformers import (AutoTokenizer, DynamicCache, InstructBlipQFormerConfig, InstructBlipQFormerModel,
                          InstructBlipVisionConfig, InstructBlipVisionModel, Phi3Config, Phi3ForCausalLM,
                          PreTrainedTokenizerFast)

import evidence
from data import EVI, EVI_END, IGNORE, render

VIDEO = "<video>"
END = "<|end|>"


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
    qformer_vocab: int = 30522
    qformer_max_text: int = 256  # instruction tokens (left-truncated)
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
    select_ratio: float = 0.6  # frames with p >= 0.6 * max p form the candidate runs
    alpha: float = 2.0         # soft targets alpha^-distance
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
    # training (train.py; DESIGN §8): AdamW, two learning rates, cosine with warm-up
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
    # data
    fps: float = 1.0
    max_len: int = 2048
    system_prompt: str = "You are a helpful AI assistant."
    tiny_vocab: int = 1000  # size of the in-code BPE tokenizer used when no LLM weights are given

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "D2VLMConfig":
        d = json.loads(text)
        d["lora_targets"] = tuple(d["lora_targets"])
        return cls(**d)


PRESETS = {
    "d2vlm-3.8b": D2VLMConfig(),
    "tiny": D2VLMConfig(image_size=112, patch_size=16, vision_width=96, vision_layers=2, vision_heads=4,
                        vision_mlp=192, qformer_width=64, qformer_layers=2, qformer_heads=4, qformer_mlp=128,
                        qformer_max_text=96, num_query_tokens=8, llm_width=128, llm_layers=4, llm_heads=4,
                        llm_mlp=256, llm_vocab=1000, llm_max_positions=1024, inject_layer=2, lora_r=16,
                        lora_alpha=32, lora_dropout=0.0, max_len=512, tiny_vocab=1000, qformer_vocab=1000,
                        # from scratch, so far larger steps than a LoRA fine-tune of pretrained weights,
                        # and two passes over the 200 synthetic videos (one leaves the grounding half-learnt)
                        lr_lora=3e-3, lr_other=3e-3, batch_size=4, epochs=2, fpo_epochs=0.5, fpo_lr_scale=0.3),
    # between the two, for speed figures on a CPU (bench.py): LLM cost no longer hidden by overheads
    "mid": D2VLMConfig(image_size=112, patch_size=14, vision_width=384, vision_layers=4, vision_heads=6,
                       vision_mlp=1536, qformer_width=384, qformer_layers=4, qformer_heads=6, qformer_mlp=1536,
                       qformer_max_text=128, num_query_tokens=16, llm_width=768, llm_layers=8, llm_heads=12,
                       llm_mlp=2048, llm_max_positions=2048, inject_layer=2, lora_r=64, lora_alpha=128,
                       max_len=1024, tiny_vocab=1000, qformer_vocab=1000, lr_lora=1e-3, lr_other=1e-3, batch_size=4),
}


# ---------------------------------------------------------------------------------------------
# Tokenizers

def build_tiny_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained in code on the synthetic dataset's phrasing, with the Phi-3 chat
    tokens and ours as special tokens. Deterministic; saved and loaded in HF format like any other."""
    import numpy as np
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    import data
    rng = np.random.default_rng(0)
    corpus = []
    for _ in range(300):
        for q, a, _, _ in data._questions(data._scene(rng), rng).values():
            corpus += [q, a]
    corpus += [f"{i}.{j} - {i + 1}.{j} seconds" for i in range(400) for j in (0, 5)]
    special = ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", END, VIDEO, EVI, EVI_END]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, show_progress=False,
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=END, pad_token="<|endoftext|>",
                                   additional_special_tokens=special[1:])


def add_special_tokens(tok):
    """Add <video>, <evi>, </evi> to an LLM tokenizer (no-op for those it has)."""
    tok.add_special_tokens({"additional_special_tokens": [VIDEO, EVI, EVI_END]})
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


# ---------------------------------------------------------------------------------------------
# Modules

def _mlp_head(d):
    """LN(d) -> Linear(d, d/2) -> GELU -> Linear(d/2, d): frm_head / evi_head."""
    return nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d // 2), nn.GELU(), nn.Linear(d // 2, d))


class Aggregator(nn.Module):
    """One token per frame from the Q-Former queries Q and the raw patches P (DESIGN §2):
    token = mean_q(softmax(q k^T / sqrt(w)) P + Q), then LN + Linear to the LLM width."""

    def __init__(self, cfg: D2VLMConfig):
        super().__init__()
        w = cfg.vision_width
        self.up = nn.Linear(cfg.qformer_width, w)
        self.q = nn.Sequential(nn.LayerNorm(w), nn.Linear(w, w))
        self.k = nn.Sequential(nn.LayerNorm(w), nn.Linear(w, w))
        self.out = nn.Sequential(nn.LayerNorm(w), nn.Linear(w, cfg.llm_width))

    def forward(self, queries, patches):
        """queries (N, Q, qformer_width), patches (N, P, vision_width) -> (N, llm_width)"""
        Q = self.up(queries)
        att = torch.softmax(self.q(Q) @ self.k(patches).transpose(1, 2) / Q.shape[-1] ** 0.5, dim=-1)
        return self.out((att @ patches + Q).mean(1))


class D2VLM(nn.Module):
    """Vision (frozen) -> Q-Former -> Aggregator -> video tokens; Phi-3 (+LoRA) with frm/evi heads."""

    def __init__(self, cfg, vision, qformer, llm, tokenizer, qformer_tokenizer):
        super().__init__()
        self.cfg = cfg
        self.vision, self.qformer, self.llm = vision, qformer, llm
        self.query_tokens = nn.Parameter(torch.randn(1, cfg.num_query_tokens, cfg.qformer_width) * cfg.init_range)
        self.aggregator = Aggregator(cfg)
        self.frm_head, self.evi_head = _mlp_head(cfg.llm_width), _mlp_head(cfg.llm_width)
        self.tokenizer, self.qformer_tokenizer = tokenizer, qformer_tokenizer
        self.token_id = {t: tokenizer.convert_tokens_to_ids(t) for t in (VIDEO, EVI, EVI_END, END)}

    # peft wraps the Phi3ForCausalLM; these reach through it
    @property
    def decoder(self):
        return self.llm.get_base_model().model

    @property
    def lm_head(self):
        return self.llm.get_base_model().lm_head

    def encode_video(self, frames, frame_mask, qformer_ids, qformer_mask):
        """frames (B, T, 3, S, S) normalised, frame_mask (B, T) -> video tokens (B, T, llm_width), zero
        at padded frames. Each frame's Q-Former also reads the instruction (qformer_ids)."""
        b_idx = frame_mask.nonzero()[:, 0]
        with torch.set_grad_enabled(self.cfg.train_base and torch.is_grad_enabled()):  # the ViT is frozen unless train_base
            patches = self.vision(pixel_values=frames[frame_mask]).last_hidden_state[:, 1:]  # post-LN, no CLS
        n_q = self.cfg.num_query_tokens
        mask = torch.cat([qformer_mask.new_ones(len(b_idx), n_q), qformer_mask[b_idx]], 1)  # queries + text
        q = self.qformer(input_ids=qformer_ids[b_idx], attention_mask=mask,
                         query_embeds=self.query_tokens.expand(len(b_idx), -1, -1),
                         encoder_hidden_states=patches).last_hidden_state[:, :n_q]
        tokens = self.aggregator(q, patches)
        out = tokens.new_zeros(*frame_mask.shape, tokens.shape[-1])
        out[frame_mask] = tokens
        return out

    def forward(self, batch):
        """Training forward on a collated batch (data.collate). Returns a dict:
        logits     (B, L, V) next-token logits aligned with batch["input_ids"] (at the video
                   placeholder: those of the last video token)
        sim        (B, Na, T) similarity logits of each answer <evi> over the frames
        evi_feats  (B, Na, d) evi_head features, read at the position that predicts each answer <evi>
        evi_mask   (B, Na) real entries; frame_mask (B, T)
        evi_branch (B, Na) for preference batches: 1 chosen, 2 rejected
        A preference batch (data.collate of pairs) packs prompt, chosen and rejected response in one
        sequence: batch["branch"] (0 prompt, 1 chosen, 2 rejected) keeps the rejected tokens from
        seeing the chosen ones and restarts their positions where the response starts;
        batch["prev"] gives the position each token follows (its predictor).
        """
        ctx = self.encode_prompt(batch)
        ids, labels = batch["input_ids"], batch["labels"]
        is_evi = ids == self.token_id[EVI]
        ans_pos, evi_mask = _positions(is_evi & (labels != IGNORE))
        spans = batch["answer_spans"]
        if spans.shape[1] != ans_pos.shape[1] or not (evi_mask == (spans[..., 0] >= 0)).all():
            raise ValueError("answer_spans must give one span per answer <evi> token")
        emb = self.suffix_embeds(ctx, ans_pos, evi_mask, spans)
        branch = batch.get("branch")
        if branch is not None:  # to suffix columns (branches 1 and 2 are all in the suffix)
            b, t = (branch > 0).nonzero(as_tuple=True)
            branch = torch.zeros_like(ctx["suf_mask"], dtype=torch.long).index_put((b, ctx["col"][b, t] - ctx["P"]), branch[b, t])
        hs = self.run(emb, ctx["suf_mask"], ctx["cache"], ctx["pre_mask"], branch=branch)
        final = torch.cat([ctx["pre_hs"][-1], hs[-1]], 1)
        match = torch.cat([ctx["pre_hs"][self.cfg.match_layer], hs[self.cfg.match_layer]], 1)
        col = ctx["col"]
        logits = self.lm_head(_gather(final, col))
        pred = batch["prev"].gather(1, ans_pos) if "prev" in batch else ans_pos - 1
        feats = self.evi_head(_gather(match, _gather_idx(col, pred)))
        out = {"logits": logits, "sim": evidence.similarity(feats, ctx["frm"]), "evi_feats": feats,
               "evi_mask": evi_mask, "frame_mask": ctx["frame_mask"]}
        if "branch" in batch:  # which response each answer <evi> belongs to (1 chosen, 2 rejected)
            out["evi_branch"] = batch["branch"].gather(1, ans_pos)
        return out

    def encode_prompt(self, batch):
        """Video tokens, the sequence layout and pass 1 (the prefix up to the end of the video, cached).

        Layout per sample: [left pad | text before the video | T video tokens] (the prefix, P columns)
        then [text after the video | right pad] (the suffix, S columns). `col` maps each position
        of input_ids to its column in prefix+suffix (the video placeholder -> the last video token)."""
        ids, attn = batch["input_ids"], batch["attention_mask"].bool()
        B, L = ids.shape
        dev = ids.device
        frame_mask = batch.get("frame_mask", torch.zeros(B, 0, dtype=torch.bool, device=dev))
        has_video = ids == self.token_id[VIDEO]
        if not (has_video.sum(1) == frame_mask.any(1).long()).all():
            raise ValueError(f"each sample needs one {VIDEO} token if it has frames and none otherwise")
        vpos = torch.where(has_video.any(1), has_video.long().argmax(1), -1)
        n_frames, lengths = frame_mask.sum(1), attn.sum(1)
        pre_len = vpos + n_frames + (vpos < 0).long()  # text before the video + the video (0 without)
        suf_len = lengths - vpos - 1
        P, S = int(pre_len.max()), int(suf_len.max())
        ar = torch.arange(L, device=dev)[None]
        col = torch.where(ar < vpos[:, None], P - pre_len[:, None] + ar, P + ar - vpos[:, None] - 1)
        col = torch.where(ar == vpos[:, None], P - 1, col)
        real = ar < lengths[:, None]
        col = torch.where(real, col, 0)
        emb = self.decoder.embed_tokens(ids)
        flat = emb.new_zeros(B, P + S, emb.shape[-1])
        b, t = (real & (ar != vpos[:, None])).nonzero(as_tuple=True)
        flat[b, col[b, t]] = emb[b, t]
        T = frame_mask.shape[1]
        vid_col = (P - n_frames)[:, None] + torch.arange(T, device=dev)[None]
        video, is_video = None, torch.zeros(B, P, dtype=torch.bool, device=dev)
        if T:
            video = self.encode_video(batch["frames"], frame_mask, batch["qformer_ids"], batch["qformer_mask"])
            b, t = frame_mask.nonzero(as_tuple=True)
            flat[b, vid_col[b, t]] = video[b, t].to(flat.dtype)
            is_video[b, vid_col[b, t]] = True
        # question <evi> (no label): + the mean raw video token over their span
        is_q = (ids == self.token_id[EVI]) & (batch["labels"] == IGNORE if "labels" in batch else real)
        q_pos, q_mask = _positions(is_q)
        qspans = batch.get("question_spans")
        if q_mask.any():
            if qspans is None or qspans.shape[1] != q_pos.shape[1] or not (q_mask == (qspans[..., 0] >= 0)).all():
                raise ValueError("question_spans must give one span per question <evi> token")
            add = evidence.pool_evidence(video, qspans.clamp(min=0)) * q_mask[..., None]
            flat = flat.index_put((torch.arange(B, device=dev)[:, None].expand_as(q_pos), _gather_idx(col, q_pos)),
                                  add.to(flat.dtype), accumulate=True)
        pre_mask = torch.arange(P, device=dev)[None] >= (P - pre_len)[:, None]
        suf_mask = torch.arange(S, device=dev)[None] < suf_len[:, None]
        cache = DynamicCache(config=self.decoder.config)
        ctx = dict(col=col, pre_mask=pre_mask, suf_mask=suf_mask, suffix=flat[:, P:], cache=cache,
                   frame_mask=frame_mask, lengths=lengths, P=P)
        pre_hs = self.run(flat[:, :P], pre_mask, cache, None, is_video) if P else [flat[:, :0]] * (self.cfg.llm_layers + 1)
        ctx["pre_hs"] = pre_hs
        vc = vid_col.clamp(0, max(P - 1, 0))
        ctx["inject"] = _gather(pre_hs[self.cfg.inject_layer], vc) if T else flat.new_zeros(B, 0, flat.shape[-1])
        ctx["frm"] = self.frm_head(_gather(pre_hs[self.cfg.match_layer], vc)) if T else ctx["inject"]
        return ctx

    def suffix_embeds(self, ctx, pos, mask, spans):
        """Suffix embeddings with the answer <evi> at `pos` (B, N) (positions in input_ids) raised by
        the mean of the layer-`inject_layer` video states over their spans (B, N, 2)."""
        emb = ctx["suffix"]
        if not mask.any():
            return emb
        add = evidence.pool_evidence(ctx["inject"], spans.clamp(min=0)) * mask[..., None]
        b = torch.arange(emb.shape[0], device=emb.device)[:, None].expand_as(pos)
        return emb.index_put((b, _gather_idx(ctx["col"], pos) - ctx["P"]), add.to(emb.dtype), accumulate=True)

    def run(self, emb, mask, cache, past_mask, is_video=None, branch=None):
        """The Phi-3 decoder on emb (B, N, D) whose real positions are `mask` (B, N), after the cached
        positions `past_mask` (B, M). One explicit 4-D boolean mask: causal, bidirectional inside the
        video block, pads invisible (a pad row sees only itself, so SDPA never gets an empty row).
        branch (B, N): 0 shared, k > 0 a branch that sees the shared tokens and its own only, with
        positions counted the same way. Returns the hidden states (embeddings, then each layer; the
        last one normed)."""
        B, N = mask.shape
        past = past_mask if past_mask is not None else mask.new_zeros(B, 0)
        M = past.shape[1]
        att = torch.ones(N, N, dtype=torch.bool, device=mask.device).tril()[None] & mask[:, None, :]
        if is_video is not None:
            att = att | (is_video[:, :, None] & is_video[:, None, :])
        if branch is not None:
            att = att & ((branch[:, None, :] == 0) | (branch[:, None, :] == branch[:, :, None]))
            own_branch = torch.stack([(mask & (branch == k)).long().cumsum(1) for k in range(int(branch.max()) + 1)], 0)
            seen_before = own_branch[0] + torch.where(branch > 0, own_branch.gather(0, branch[None])[0], 0)
        else:
            seen_before = mask.long().cumsum(1)
        own = torch.eye(N, dtype=torch.bool, device=mask.device)[None]
        full = torch.cat([past[:, None, :].expand(B, N, M), att | own], 2)
        pos = (past.sum(1, keepdim=True) + seen_before - 1).clamp(min=0)
        out = self.decoder(inputs_embeds=emb, attention_mask=full[:, None], position_ids=pos,
                           past_key_values=cache, use_cache=True, output_hidden_states=True)
        return out.hidden_states


def _positions(mask):
    """(B, L) bool -> positions of the True entries (B, N) left-aligned, padded with 0, and their mask."""
    n = mask.sum(1)
    N = int(n.max()) if mask.numel() else 0
    order = torch.sort((~mask).long(), dim=1, stable=True).indices[:, :N]
    valid = torch.arange(N, device=mask.device)[None] < n[:, None]
    return torch.where(valid, order, 0), valid


def _gather(x, idx):
    """x (B, L, D), idx (B, N) -> (B, N, D)"""
    return x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))


def _gather_idx(col, pos):
    return col.gather(1, pos.clamp(min=0))


# ---------------------------------------------------------------------------------------------
# Generation

@torch.no_grad()
def generate(model, batch, max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
             generator=None, use_cache: bool = True):
    """Batched decoding from prompts (a collated batch without responses). Greedy at temperature 0,
    else sampling (temperature, top_p). Each emitted <evi> gets the span chosen from its similarity
    over the frames (evidence.select_interval), and its next input embedding is raised by the mean
    layer-`inject_layer` video state over that span. Stops a sample at <|end|>.
    use_cache=False recomputes the whole sequence at every step (a reference for tests).
    Returns one dict per sample: text (each <evi> as "s - e" seconds), tokens, spans (seconds), and
    probs: for each <evi>, sigmoid(similarity) over the sample's frames (what its span was chosen from)."""
    cfg, tid = model.cfg, model.token_id
    B = batch["input_ids"].shape[0]
    ctx = model.encode_prompt(batch)
    suffix, suf_mask = ctx["suffix"], ctx["suf_mask"]
    hs = model.run(suffix, suf_mask, ctx["cache"], ctx["pre_mask"])
    last = ctx["col"].gather(1, (ctx["lengths"] - 1)[:, None])[:, 0] - ctx["P"]
    h_last = hs[-1][torch.arange(B), last]
    m_last = hs[cfg.match_layer][torch.arange(B), last]
    past = torch.cat([ctx["pre_mask"], suf_mask], 1)
    done = torch.zeros(B, dtype=torch.bool, device=suffix.device)
    tokens, spans, probs, new_embs = [[] for _ in range(B)], [[] for _ in range(B)], [[] for _ in range(B)], []
    n_frames = ctx["frame_mask"].sum(1).tolist()
    pad = model.tokenizer.pad_token_id
    for _ in range(max_new_tokens):
        logits = model.lm_head(h_last).float()
        tok = _choose(logits, temperature, top_p, generator)
        tok = torch.where(done, pad, tok)
        emb = model.decoder.embed_tokens(tok)
        is_evi = (tok == tid[EVI]) & ~done
        if is_evi.any():
            sim = evidence.similarity(model.evi_head(m_last)[:, None], ctx["frm"])
            span = evidence.select_interval(sim, cfg.select_ratio, ctx["frame_mask"])  # (B, 1, 2)
            emb = emb + evidence.pool_evidence(ctx["inject"], span)[:, 0] * is_evi[:, None]
            for i in is_evi.nonzero()[:, 0].tolist():
                spans[i].append([v / cfg.fps for v in span[i, 0].tolist()])
                probs[i].append(torch.sigmoid(sim[i, 0, :n_frames[i]].float()).tolist())
        for i in (~done).nonzero()[:, 0].tolist():
            tokens[i].append(int(tok[i]))
        live = ~done
        done = done | (tok == tid[END])
        if done.all():
            break
        new_embs.append(emb)
        if use_cache:
            hs = model.run(emb[:, None], live[:, None], ctx["cache"], past)
            past = torch.cat([past, live[:, None]], 1)
            h_last, m_last = hs[-1][:, 0], hs[cfg.match_layer][:, 0]
        else:  # recompute prefix and everything after it from scratch
            ctx = model.encode_prompt(batch)
            past = torch.cat([past, live[:, None]], 1)
            gen_mask = past[:, ctx["P"] + suffix.shape[1]:]
            hs = model.run(torch.cat([ctx["suffix"], torch.stack(new_embs, 1)], 1),
                           torch.cat([suf_mask, gen_mask], 1), ctx["cache"], ctx["pre_mask"])
            h_last, m_last = hs[-1][:, -1], hs[cfg.match_layer][:, -1]
    out = []
    for i in range(B):
        toks = tokens[i][:-1] if tokens[i] and tokens[i][-1] == tid[END] else tokens[i]
        raw = model.tokenizer.decode(toks, skip_special_tokens=False)
        out.append({"text": render(raw, spans[i]), "tokens": tokens[i], "spans": spans[i], "probs": probs[i]})
    return out


def _choose(logits, temperature, top_p, generator):
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, -1)
    if top_p < 1:
        sp, si = probs.sort(-1, descending=True)
        keep = sp.cumsum(-1) - sp < top_p
        probs = torch.zeros_like(probs).scatter(-1, si, sp * keep)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


# ---------------------------------------------------------------------------------------------
# Building

def vision_config(cfg):
    return InstructBlipVisionConfig(hidden_size=cfg.vision_width, num_hidden_layers=cfg.vision_layers,
                                    num_attention_heads=cfg.vision_heads, intermediate_size=cfg.vision_mlp,
                                    image_size=cfg.image_size, patch_size=cfg.patch_size,
                                    initializer_range=cfg.init_range)


def qformer_config(cfg):
    return InstructBlipQFormerConfig(hidden_size=cfg.qformer_width, num_hidden_layers=cfg.qformer_layers,
                                     num_attention_heads=cfg.qformer_heads, intermediate_size=cfg.qformer_mlp,
                                     cross_attention_frequency=cfg.qformer_cross_every,
                                     encoder_hidden_size=cfg.vision_width, vocab_size=cfg.qformer_vocab,
                                     hidden_dropout_prob=cfg.qformer_dropout,
                                     attention_probs_dropout_prob=cfg.qformer_dropout)


def llm_config(cfg, vocab, tok):
    return Phi3Config(vocab_size=vocab, hidden_size=cfg.llm_width, num_hidden_layers=cfg.llm_layers,
                      num_attention_heads=cfg.llm_heads, num_key_value_heads=cfg.llm_heads,
                      intermediate_size=cfg.llm_mlp, max_position_embeddings=cfg.llm_max_positions,
                      original_max_position_embeddings=cfg.llm_max_positions,
                      pad_token_id=tok.pad_token_id, bos_token_id=None, eos_token_id=tok.convert_tokens_to_ids(END),
                      rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta})


def build_model(cfg: D2VLMConfig, vision_weights=None, llm_weights=None, tokenizer_dir=None) -> D2VLM:
    """The D2VLM of `cfg`. vision_weights: a local InstructBLIP checkpoint directory (only its
    vision_model.*, qformer.* and query_tokens tensors are read, shard by shard; the language model
    in it is never loaded) with its qformer_tokenizer/. llm_weights: a local Phi-3 directory (model
    and tokenizer). Without them the weights are random and the tokenizer is the in-code BPE (or the
    one saved in tokenizer_dir). Nothing is fetched from the network."""
    for p in (vision_weights, llm_weights, tokenizer_dir):
        if p is not None and not Path(p).is_dir():
            raise FileNotFoundError(f"{p}: weights directory not found")
    if llm_weights is not None:
        tok = AutoTokenizer.from_pretrained(llm_weights, local_files_only=True)
    elif tokenizer_dir is not None:
        tok = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    else:
        tok = build_tiny_tokenizer(cfg.tiny_vocab)
    vision = InstructBlipVisionModel(vision_config(cfg))
    qformer = InstructBlipQFormerModel(qformer_config(cfg))
    qtok = tok
    if vision_weights is not None:
        qtok = AutoTokenizer.from_pretrained(Path(vision_weights) / "qformer_tokenizer", local_files_only=True)
    if len(qtok) > cfg.qformer_vocab:
        raise ValueError(f"the Q-Former tokenizer has {len(qtok)} tokens, more than qformer_vocab={cfg.qformer_vocab}")
    if llm_weights is not None:
        llm = Phi3ForCausalLM.from_pretrained(llm_weights, local_files_only=True, dtype=torch.float32)
    else:
        llm = Phi3ForCausalLM(llm_config(cfg, max(cfg.llm_vocab, len(tok)), tok))
    add_special_tokens(tok)
    if len(tok) > llm.get_input_embeddings().weight.shape[0]:
        llm.resize_token_embeddings(len(tok), mean_resizing=False)
    from peft import LoraConfig, get_peft_model
    llm = get_peft_model(llm, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                         target_modules=list(cfg.lora_targets)))
    model = D2VLM(cfg, vision, qformer, llm, tok, qtok)
    if vision_weights is not None:
        load_instructblip(model, vision_weights)
    # what trains: LoRA, embeddings + LM head (the new <evi> rows), heads, Q-Former attention,
    # query tokens, aggregator. The ViT is frozen. cfg.train_base: everything trains.
    for n, p in model.named_parameters():
        p.requires_grad = cfg.train_base or (n.startswith(("query_tokens", "aggregator.", "frm_head.", "evi_head."))
                           or "lora_" in n or (n.startswith("qformer.") and "attention" in n)
                           or n.endswith(("embed_tokens.weight", "lm_head.weight")))
    return model


def load_instructblip(model: D2VLM, directory) -> None:
    """Copy vision_model.*, qformer.*, query_tokens from the safetensors shards of an InstructBLIP
    checkpoint directory into `model`, reading only the shards that hold them."""
    from safetensors import safe_open
    d = Path(directory)
    index = d / "model.safetensors.index.json"
    if index.is_file():
        wmap = json.loads(index.read_text())["weight_map"]
        shards = sorted({f for k, f in wmap.items() if k.startswith(("vision_model.", "qformer.", "query_tokens"))})
    elif (d / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{d}: no model.safetensors or model.safetensors.index.json")
    vis, qf, qt = {}, {}, None
    for shard in shards:
        with safe_open(str(d / shard), framework="pt") as f:
            for k in f.keys():
                if k.startswith("vision_model."):
                    vis[k[len("vision_model."):]] = f.get_tensor(k)
                elif k.startswith("qformer."):
                    qf[k[len("qformer."):]] = f.get_tensor(k)
                elif k == "query_tokens":
                    qt = f.get_tensor(k)
    if qt is None or not vis or not qf:
        raise ValueError(f"{d}: missing vision_model.*, qformer.* or query_tokens tensors")
    model.vision.load_state_dict(vis, strict=True)
    model.qformer.load_state_dict(qf, strict=True)
    with torch.no_grad():
        model.query_tokens.copy_(qt)


# ---------------------------------------------------------------------------------------------
# Saving and loading weights

WEIGHTS = "model.safetensors"  # the non-LoRA tensors of a checkpoint directory
ADAPTER = "adapter"            # the LoRA adapter, a standard peft directory


def save_weights(model: D2VLM, directory, full: bool) -> None:
    """Write model weights into `directory` (which must exist): the LoRA adapter as a peft
    directory, the other trainable tensors (all non-LoRA tensors when `full`: a model built without
    weight directories has random frozen parts that must travel with it) as safetensors, the config
    and the tokenizer."""
    from safetensors.torch import save_file
    d = Path(directory)
    model.llm.save_pretrained(d / ADAPTER, save_embedding_layers=False)
    tensors = {n: p.detach().contiguous() for n, p in model.named_parameters()
               if "lora_" not in n and (full or p.requires_grad)}
    save_file(tensors, str(d / WEIGHTS), metadata={"full": str(full)})
    (d / "config.json").write_text(model.cfg.to_json())
    model.tokenizer.save_pretrained(d / "tokenizer")


def load_weights(model: D2VLM, directory) -> None:
    """Load what save_weights wrote into a model built with the same config (and the same weight
    directories when the checkpoint is not full). Every tensor in the files must match by name and shape."""
    from peft import set_peft_model_state_dict
    from safetensors import safe_open
    from safetensors.torch import load_file
    d = Path(directory)
    for f in (d / WEIGHTS, d / ADAPTER / "adapter_model.safetensors"):
        if not f.is_file():
            raise FileNotFoundError(f"{f}: checkpoint file not found")
    params = dict(model.named_parameters())
    with safe_open(str(d / WEIGHTS), framework="pt") as f:
        with torch.no_grad():
            for k in f.keys():
                if k not in params:
                    raise ValueError(f"{d / WEIGHTS}: tensor {k} does not exist in this model")
                t = f.get_tensor(k)
                if t.shape != params[k].shape:
                    raise ValueError(f"{d / WEIGHTS}: tensor {k} has shape {tuple(t.shape)}, "
                                     f"the model expects {tuple(params[k].shape)}")
                params[k].copy_(t)
    res = set_peft_model_state_dict(model.llm, load_file(str(d / ADAPTER / "adapter_model.safetensors")))
    if res.unexpected_keys:
        raise ValueError(f"{d / ADAPTER}: unexpected adapter tensors, e.g. {res.unexpected_keys[0]}")


def from_checkpoint(directory, vision_weights=None, llm_weights=None, cfg: D2VLMConfig | None = None) -> D2VLM:
    """The model saved in a checkpoint directory (config.json, tokenizer/, weights). A checkpoint
    that is not full also needs the weight directories the run was built from. `cfg` replaces the
    saved config (same architecture, other training settings: FPO after SFT)."""
    from safetensors import safe_open
    d = Path(directory)
    if not (d / "config.json").is_file():
        raise FileNotFoundError(f"{d}: not a checkpoint directory (no config.json)")
    with safe_open(str(d / WEIGHTS), framework="pt") as f:
        full = f.metadata().get("full") == "True"
    if not full and (vision_weights is None or llm_weights is None):
        raise ValueError(f"{d}: holds only the trained tensors; give the --vision-weights and --llm-weights it was trained from")
    cfg = cfg or D2VLMConfig.from_json((d / "config.json").read_text())
    m = build_model(cfg, vision_weights, llm_weights, tokenizer_dir=d / "tokenizer")
    load_weights(m, d)
    return m
