"""The D2VLM model: EVA ViT-G/14 -> Q-Former -> one token per frame -> Phi-3 with <evi> tokens.

Paper: "Overall Architecture" and "Evidence Token". docs/design.md#model, docs/design.md#evidence-tokens.

    build_model(cfg, tokenizer, ...)  vision + Q-Former + aggregator, Phi-3 + LoRA, frm/evi heads
    D2VLM.forward(batch)              training forward, the paper's steps in order: encode_prompt (the video
                                      encoded, pass 1), answer_evidence, capture_evidence (average pooling
                                      and addition), the response (pass 2), grounding (evidence.similarity)
    D2VLM.encode_prompt(batch)        video tokens, the layout, pass 1 -> Prompt (decoding.py goes on from it)
    layout(...)                       what makes the two passes one LLM forward: where each position goes
    build_tiny_tokenizer(vocab)       the in-code BPE of the embedded default
(config.py holds the numbers, decoding.py the generation loop, checkpoint.py the weight files.)

How one sequence runs through the LLM. The user turn holds one video placeholder; it becomes T video
tokens, with bidirectional attention among them and causal attention everywhere else (one explicit
4-D mask, SDPA). The video states depend only on what comes before them (the prefix), so the LLM
runs the prefix once with a cache (pass 1), we read the layer-`inject_layer` video states off it,
add their span means to the answer <evi> embeddings, and run the rest (pass 2) on the cache: one
LLM forward in all, no second run.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from transformers import (DynamicCache, InstructBlipQFormerConfig, InstructBlipQFormerModel, InstructBlipVisionConfig,
                          InstructBlipVisionModel, Phi3Config, Phi3ForCausalLM, PreTrainedTokenizerFast)

import event_videos
import evidence
from batches import IGNORE
from config import D2VLMConfig, check, check_size
from data import ASSISTANT, END, END_OF_TEXT, SYSTEM, USER, VIDEO
from evidence import EVI, EVI_END


# ---------------------------------------------------------------------------------------------
# Tokenizers

def build_tiny_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained in code on the synthetic dataset's phrasing, with the Phi-3 chat
    tokens and ours as special tokens. Deterministic; saved and loaded in HF format like any other."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    # the synthetic questions and answers, and timestamps as E.T.Instruct writes them (0.0 - 400.5 s)
    corpus = event_videos.corpus() + [f"{i}.{j} - {i + 1}.{j} seconds" for i in range(400) for j in (0, 5)]
    special = [END_OF_TEXT, SYSTEM, USER, ASSISTANT, END, VIDEO, EVI, EVI_END]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, show_progress=False,
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=END, pad_token=END_OF_TEXT,
                                   additional_special_tokens=special[1:])


def add_special_tokens(tok):
    """Add <evi>, </evi>, <video> to an LLM tokenizer, in this order (no-op for those it has): on
    Phi-3's 32011-entry tokenizer <evi> = 32011 and </evi> = 32012, the ids the released weights use."""
    tok.add_special_tokens({"additional_special_tokens": [EVI, EVI_END, VIDEO]})
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


# ---------------------------------------------------------------------------------------------
# Modules

def _mlp_head(d):
    """LN(d) -> Linear(d, d/2) -> GELU -> Linear(d/2, d): frm_head / evi_head."""
    return nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d // 2), nn.GELU(), nn.Linear(d // 2, d))


class Aggregator(nn.Module):
    """One token per frame from the Q-Former queries Q and the raw patches P (docs/design.md#model):
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
        # the paper's MLP projections that decouple the <evi> token's two roles: its state goes on
        # generating text through lm_head, while evi_head (the token) and frm_head (each frame's video
        # token) project the states in which it queries the frames (evidence.similarity)
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
        patches = self.patches(frames[frame_mask])
        tokens = self.aggregator(self.query_outputs(patches, qformer_ids[b_idx], qformer_mask[b_idx]), patches)
        out = tokens.new_zeros(*frame_mask.shape, tokens.shape[-1])
        out[frame_mask] = tokens
        return out

    def patches(self, frames):
        """frames (N, 3, S, S) normalised -> raw ViT patches (N, P, vision_width), no CLS; frozen unless train_base."""
        with torch.set_grad_enabled(self.cfg.train_base and torch.is_grad_enabled()):
            return self.vision.encoder(inputs_embeds=self.vision.embeddings(frames)).last_hidden_state[:, 1:]

    def query_outputs(self, patches, ids=None, mask=None):
        """patches (N, P, vision_width) [+ text ids, mask (N, L)] -> Q-Former query outputs (N, Q, qformer_width),
        the patches read through a LayerNorm that trains (upstream's qformer_ln; the aggregator reads them raw)."""
        n_q, q = self.cfg.num_query_tokens, self.query_tokens.expand(len(patches), -1, -1)
        seen = None if ids is None else torch.cat([mask.new_ones(len(patches), n_q), mask], 1)  # queries + text
        return self.qformer(input_ids=ids, attention_mask=seen, query_embeds=q,
                            encoder_hidden_states=self.vision.post_layernorm(patches)).last_hidden_state[:, :n_q]

    def forward(self, batch):
        """Training forward on a collated batch (batches.collate), the paper's steps in order. With the
        spans known (teacher forcing), both stages of the response run in one pass: the video and the
        text before it once (encode_prompt), then the whole response on that cache. Returns a dict:
        logits     (B, L, V) next-token logits aligned with batch["input_ids"] (at the video
                   placeholder: those of the last video token)
        sim        (B, Na, T) similarity logits of each answer <evi> over the frames
        evi_feats  (B, Na, d) evi_head features, read at the position that predicts each answer <evi>
        evi_mask   (B, Na) real entries; frame_mask (B, T)
        evi_branch (B, Na) for preference batches: 1 chosen, 2 rejected
        A preference batch (batches.collate of pairs) packs prompt, chosen and rejected response in one
        sequence: batch["branch"] (0 prompt, 1 chosen, 2 rejected) keeps the rejected tokens from
        seeing the chosen ones and restarts their positions where the response starts;
        batch["prev"] gives the position each token follows (its predictor).
        """
        # 1. encode the video; the text before it and the video through the LLM (pass 1)
        prompt = self.encode_prompt(batch)
        # 2. the response's <evi>: stage 1's (the evidence) and stage 2's (the answer's references to it)
        pos, evi_mask, spans = self.answer_evidence(batch)
        # 3. each <evi> takes in the video states of its span (average pooling and addition)
        response = self.capture_evidence(prompt, pos, evi_mask, spans)
        # 4. the response through the LLM on the prefix's cache (pass 2): its tokens and its <evi>
        branch = batch.get("branch")
        hs = self.run(response, prompt.suf_mask, prompt.cache, prompt.pre_mask,
                      branch=None if branch is None else _to_suffix_columns(branch, prompt))
        logits = self.lm_head(prompt.at(prompt.states(hs, -1)))
        # 5. grounding: the evi_head feature of the state that predicts each <evi> against each frame's
        # frm_head feature (the heads that keep the token's querying role apart from its generating one)
        predictor = batch["prev"].gather(1, pos) if "prev" in batch else pos - 1
        feats = self.evi_head(prompt.at(prompt.states(hs, self.cfg.match_layer), predictor))
        out = {"logits": logits, "sim": evidence.similarity(feats, prompt.frm), "evi_feats": feats,
               "evi_mask": evi_mask, "frame_mask": prompt.frame_mask}
        if branch is not None:  # which response each answer <evi> belongs to (1 chosen, 2 rejected)
            out["evi_branch"] = branch.gather(1, pos)
        return out

    def answer_evidence(self, batch):
        """The response's <evi> tokens (those with a label): positions in input_ids (B, Na), padded
        with 0, their mask (B, Na) and their spans batch["answer_spans"] (B, Na, 2) in frames."""
        pos, mask = _positions((batch["input_ids"] == self.token_id[EVI]) & (batch["labels"] != IGNORE))
        spans = batch["answer_spans"]
        if spans.shape[1] != pos.shape[1] or not (mask == (spans[..., 0] >= 0)).all():
            raise ValueError("answer_spans must give one span per answer <evi> token")
        return pos, mask, spans

    def encode_prompt(self, batch) -> "Prompt":
        """Video tokens, the sequence layout and pass 1: the prefix (everything up to the end of the
        video) through the LLM once, its keys and values cached. See `Prompt` for what it holds."""
        ids = batch["input_ids"]
        B, dev = ids.shape[0], ids.device
        frame_mask = batch.get("frame_mask", torch.zeros(B, 0, dtype=torch.bool, device=dev))
        lay = layout(ids, batch["attention_mask"].bool(), frame_mask, self.token_id[VIDEO], self.cfg.seq_multiple)
        flat, is_video = self.embed_prompt(batch, lay, frame_mask)
        P, T = lay.P, frame_mask.shape[1]
        cache = DynamicCache(config=self.decoder.config)
        pre_hs = (self.run(flat[:, :P], lay.pre_mask, cache, None, is_video) if P
                  else [flat[:, :0]] * (self.cfg.llm_layers + 1))
        vc = lay.vid_col.clamp(0, max(P - 1, 0))
        inject = _gather(pre_hs[self.cfg.inject_layer], vc) if T else flat.new_zeros(B, 0, flat.shape[-1])
        frm = self.frm_head(_gather(pre_hs[self.cfg.match_layer], vc)) if T else inject
        return Prompt(col=lay.col, pre_mask=lay.pre_mask, suf_mask=lay.suf_mask, suffix=flat[:, P:], cache=cache,
                      pre_hs=pre_hs, inject=inject, frm=frm, frame_mask=frame_mask, lengths=lay.lengths, P=P)

    def embed_prompt(self, batch, lay: "Layout", frame_mask):
        """The LLM input of prefix + suffix, (B, P + S, D): token embeddings and video tokens in their
        columns, each question <evi> (no label) raised by the mean raw video token over its span.
        Also returns which prefix columns hold video tokens (B, P)."""
        ids, B, dev = batch["input_ids"], len(lay.col), lay.col.device
        L, P, T = ids.shape[1], lay.P, frame_mask.shape[1]
        ar = torch.arange(L, device=dev)[None]
        emb = self.decoder.embed_tokens(ids)
        flat = emb.new_zeros(B, P + lay.S, emb.shape[-1])
        b, t = (lay.real & (ar != lay.vpos[:, None])).nonzero(as_tuple=True)
        flat[b, lay.col[b, t]] = emb[b, t]
        video, is_video = None, torch.zeros(B, P, dtype=torch.bool, device=dev)
        if T:
            video = self.encode_video(batch["frames"], frame_mask, batch["qformer_ids"], batch["qformer_mask"])
            b, t = frame_mask.nonzero(as_tuple=True)
            flat[b, lay.vid_col[b, t]] = video[b, t].to(flat.dtype)
            is_video[b, lay.vid_col[b, t]] = True
        is_q = (ids == self.token_id[EVI]) & (batch["labels"] == IGNORE if "labels" in batch else lay.real)
        q_pos, q_mask = _positions(is_q)
        qspans = batch.get("question_spans")
        if q_mask.any():
            if qspans is None or qspans.shape[1] != q_pos.shape[1] or not (q_mask == (qspans[..., 0] >= 0)).all():
                raise ValueError("question_spans must give one span per question <evi> token")
            add = evidence.pool_evidence(video, qspans.clamp(min=0)) * q_mask[..., None]
            flat = _add_at(flat, lay.col.gather(1, q_pos), add)
        return flat, is_video

    def capture_evidence(self, prompt: "Prompt", pos, mask, spans):
        """The paper's visual semantic capture: the suffix's input embeddings (B, S, D) with each answer
        <evi> at `pos` (B, N) (positions in input_ids; `mask` (B, N) the real ones) raised by the mean
        of the layer-`inject_layer` video states over its span (B, N, 2), in frames. The token
        embeddings alone when cfg.semantic_capture is off (ablation B2)."""
        if not mask.any() or not self.cfg.semantic_capture:
            return prompt.suffix
        add = evidence.pool_evidence(prompt.inject, spans.clamp(min=0)) * mask[..., None]
        return _add_at(prompt.suffix, prompt.columns(pos) - prompt.P, add)

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
        visible = torch.cat([past[:, None, :].expand(B, N, M), att | own], 2)
        pos = (past.sum(1, keepdim=True) + seen_before - 1).clamp(min=0)
        out = self.decoder(inputs_embeds=emb, attention_mask=visible[:, None], position_ids=pos,
                           past_key_values=cache, use_cache=True, output_hidden_states=True)
        return out.hidden_states


@dataclass
class Layout:
    """Where each input position goes. Per sample: [left pad | text before the video | T video
    tokens] is the prefix (P columns), [text after the video | right pad] the suffix (S columns).
    B samples, L input positions."""
    col: torch.Tensor       # (B, L) long: the column of each input position (video placeholder -> last video token, pads -> 0)
    vid_col: torch.Tensor   # (B, T) long: the column of each frame's video token
    vpos: torch.Tensor      # (B,) long: position of the video placeholder, -1 without video
    real: torch.Tensor      # (B, L) bool: not padding
    lengths: torch.Tensor   # (B,) long: real input positions
    pre_mask: torch.Tensor  # (B, P) bool: real prefix columns (left padded)
    suf_mask: torch.Tensor  # (B, S) bool: real suffix columns (right padded)
    P: int
    S: int


def layout(ids, attn, frame_mask, video_id: int, multiple: int = 1) -> Layout:
    """The prefix / suffix layout of right-padded input_ids (B, L) with attention_mask attn (B, L)
    and frame_mask (B, T): each sample's video placeholder expands to its frames, the prefix is
    left-aligned to end at column P - 1 (the last video token) for every sample. P and S are
    rounded up to `multiple` (more padding columns, fewer distinct shapes)."""
    B, L = ids.shape
    dev = ids.device
    has_video = ids == video_id
    if not (has_video.sum(1) == frame_mask.any(1).long()).all():
        raise ValueError(f"each sample needs one {VIDEO} token if it has frames and none otherwise")
    vpos = torch.where(has_video.any(1), has_video.long().argmax(1), -1)
    n_frames, lengths = frame_mask.sum(1), attn.sum(1)
    pre_len = vpos + n_frames + (vpos < 0).long()  # text before the video + the video (0 without)
    suf_len = lengths - vpos - 1
    P, S = round_up(int(pre_len.max()), multiple), round_up(int(suf_len.max()), multiple)
    ar = torch.arange(L, device=dev)[None]
    col = torch.where(ar < vpos[:, None], P - pre_len[:, None] + ar, P + ar - vpos[:, None] - 1)
    col = torch.where(ar == vpos[:, None], P - 1, col)
    real = ar < lengths[:, None]
    vid_col = (P - n_frames)[:, None] + torch.arange(frame_mask.shape[1], device=dev)[None]
    return Layout(col=torch.where(real, col, 0), vid_col=vid_col, vpos=vpos, real=real, lengths=lengths,
                  pre_mask=torch.arange(P, device=dev)[None] >= (P - pre_len)[:, None],
                  suf_mask=torch.arange(S, device=dev)[None] < suf_len[:, None], P=P, S=S)


@dataclass
class Prompt:
    """What D2VLM.encode_prompt computes once per batch, for forward and generate to go on from.
    B samples, L input positions, P prefix / S suffix columns, T frames, D = llm_width."""
    col: torch.Tensor          # (B, L) long: the column of each input position (Layout.col)
    pre_mask: torch.Tensor     # (B, P) bool: real prefix columns
    suf_mask: torch.Tensor     # (B, S) bool: real suffix columns
    suffix: torch.Tensor       # (B, S, D): the suffix's input embeddings (question <evi> raised, answer <evi> not yet)
    cache: DynamicCache        # the prefix's keys and values, every layer
    pre_hs: tuple              # llm_layers + 1 tensors (B, P, D): the prefix's hidden states (embeddings first)
    inject: torch.Tensor       # (B, T, D): layer-inject_layer video states (what an answer <evi> takes in)
    frm: torch.Tensor          # (B, T, D): frm_head features of the layer-match_layer video states
    frame_mask: torch.Tensor   # (B, T) bool
    lengths: torch.Tensor      # (B,) long: real input positions
    P: int

    def columns(self, pos):
        """Input positions (B, N) -> their LLM columns (B, N) (prefix 0..P-1, then the suffix)."""
        return self.col.gather(1, pos.clamp(min=0))

    def states(self, hs, layer: int):
        """One layer's hidden states over all columns (B, P + S, D): the prefix's, then those of hs
        (the suffix's, as run returns them)."""
        return torch.cat([self.pre_hs[layer], hs[layer]], 1)

    def at(self, states, pos=None):
        """states (B, P + S, D) -> those of the input positions pos (B, N) (default: every input
        position, (B, L, D))."""
        return _gather(states, self.col if pos is None else self.columns(pos))


def _to_suffix_columns(branch, prompt: Prompt):
    """Per-position branch labels (B, L) -> per suffix column (B, S). A packed pair's responses
    (branches 1 and 2) lie wholly in the suffix; the prompt (0) needs no column there."""
    b, t = (branch > 0).nonzero(as_tuple=True)
    return torch.zeros_like(prompt.suf_mask, dtype=torch.long).index_put((b, prompt.col[b, t] - prompt.P), branch[b, t])


def round_up(n: int, multiple: int) -> int:
    """n rounded up to a multiple of `multiple` (the LLM's column counts: config.seq_multiple)."""
    return -(-n // multiple) * multiple


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


def _add_at(x, cols, add):
    """x (B, C, D) with add (B, N, D) added at columns cols (B, N) of each row (repeats accumulate)."""
    b = torch.arange(x.shape[0], device=x.device)[:, None].expand_as(cols)
    return x.index_put((b, cols), add.to(x.dtype), accumulate=True)


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


def build_model(cfg: D2VLMConfig, tokenizer=None, qformer_tokenizer=None, llm=None) -> D2VLM:
    """The D2VLM of `cfg` with random weights, or around a pretrained `llm` (a Phi3ForCausalLM).
    tokenizer: the LLM's (default: the in-code BPE, build_tiny_tokenizer); <video>, <evi>, </evi>
    are added to it. qformer_tokenizer: the Q-Former's (default: the LLM's). Loading weights from
    directories is checkpoint.py's job (checkpoint.from_weights, checkpoint.from_checkpoint)."""
    problem = check(cfg) or check_size(cfg)  # before any memory is spent
    if problem:
        raise ValueError(problem)
    tok = tokenizer if tokenizer is not None else build_tiny_tokenizer(cfg.tiny_vocab)
    qtok = qformer_tokenizer if qformer_tokenizer is not None else tok
    if len(qtok) > cfg.qformer_vocab:
        raise ValueError(f"the Q-Former tokenizer has {len(qtok)} tokens, more than qformer_vocab={cfg.qformer_vocab}")
    vision = InstructBlipVisionModel(vision_config(cfg))
    vision.post_layernorm.eps = cfg.qformer_ln_eps  # HF uses the ViT's eps for it; LAVIS's ln_vision has its own
    qformer = InstructBlipQFormerModel(qformer_config(cfg))
    if llm is None:
        llm = Phi3ForCausalLM(llm_config(cfg, max(cfg.llm_vocab, len(tok)), tok))
    add_special_tokens(tok)
    if len(tok) > llm.get_input_embeddings().weight.shape[0]:
        llm.resize_token_embeddings(len(tok), mean_resizing=False)
    model = D2VLM(cfg, vision, qformer, _with_lora(llm, cfg), tok, qtok)
    _set_trainable(model)
    return model


def _with_lora(llm, cfg):
    """A fresh LoRA (B = 0: the same function) on cfg.lora_targets of a Phi3ForCausalLM."""
    from peft import LoraConfig, get_peft_model
    return get_peft_model(llm, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                          target_modules=list(cfg.lora_targets)))


def _set_trainable(model) -> None:
    """What trains: LoRA, embeddings + LM head (the new <evi> rows), heads, Q-Former attention, the
    LayerNorm before it, query tokens, aggregator. The ViT is frozen. cfg.train_base: everything."""
    for n, p in model.named_parameters():
        p.requires_grad = model.cfg.train_base or (
            n.startswith(("query_tokens", "aggregator.", "frm_head.", "evi_head.", "vision.post_layernorm."))
            or "lora_" in n or (n.startswith("qformer.") and "attention" in n)
            or n.endswith(("embed_tokens.weight", "lm_head.weight")))


def merge_and_fresh_lora(model: D2VLM, cfg: D2VLMConfig | None = None) -> D2VLM:
    """The release's FPO start: the trained LoRA merged into the LLM's weights, then a fresh LoRA
    (cfg's r, alpha, dropout, targets, cfg the model's from then on; default model.cfg; B = 0, so
    the model computes what it computed). In place; returns the model."""
    model.cfg = cfg or model.cfg
    model.llm = _with_lora(model.llm.merge_and_unload(), model.cfg)
    _set_trainable(model)
    return model


def use_cuda_settings() -> None:
    """How the recipe runs on CUDA: TF32 matmuls, and attention (SDPA) without cuDNN's backend, which
    plans every new (batch, length) shape anew (measured on an H200: 29 ms of host time per call,
    the tiny recipe at 0.3-1.0 s/step; 0.10 s/step without it); flash and memory-efficient
    attention take any shape as it comes."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cuda.enable_cudnn_sdp(False)


def for_inference(model: D2VLM, device) -> D2VLM:
    """The model as evaluation runs it: eval mode, on `device`. On CUDA also the LoRA merged into the
    LLM's weights (peft's merge_adapter: one matmul per projection, not three) and the frozen
    weights held in bf16 (run it under bf16 autocast, as training does); on the CPU it computes
    exactly what it trained as. In place; returns the model."""
    model.eval().to(device)
    if torch.device(device).type == "cuda":
        model.llm.merge_adapter()
        hold_frozen_in(model, torch.bfloat16)
    return model


def hold_frozen_in(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast the frozen parameters (the ViT, the LLM's base weights under LoRA, ...) to `dtype` in
    place; the trained ones keep theirs (fp32 master weights for AdamW). Run the model under
    autocast of that dtype afterwards. Returns the model."""
    for p in model.parameters():
        if not p.requires_grad:
            p.data = p.data.to(dtype)
    return model
