"""Decoding: batched generation with a KV cache and evidence injection. Paper: "Evidence Token"
(inference: each generated <evi> picks its span and takes in its frames).

    generate(model, batch, max_new_tokens, temperature, ...)   one dict per sample: text, tokens, spans, probs
    localize_and_capture(model, prompt, ...)   the paper's step for one generated <evi>: similarity -> span ->
                              the span's pooled video states -> added to its next input embedding
    DECODINGS                 the named protocols: "greedy" (ours) and "release" (the D2VLM release's,
                              docs/release.md#inference-protocol: sampling at 0.2, repetition penalty 1.2 on
                              multiple choice, 2048 new tokens, its span text)
    repetition_penalty(...)   the release's penalty, as a pure function
"""
from __future__ import annotations

import torch

import evidence
from data import END, MCQ_TASKS, VIDEO, pair_boundaries, render
from evidence import EVI

DECODINGS = {
    "greedy": {"temperature": 0.0, "repetition_penalty": 1.0, "max_new_tokens": 256, "span_style": "seconds"},
    "release": {"temperature": 0.2, "repetition_penalty": 1.2, "max_new_tokens": 2048, "span_style": "release"},
}
DEFAULT = "greedy"  # evaluate.py's --decoding
PENALIZED_TASKS = MCQ_TASKS  # the release penalizes repetition on multiple choice only


def repetition_penalty(logits, seen, penalty: float):
    """The release's penalty (as transformers' RepetitionPenaltyLogitsProcessor, once per distinct
    token): logits (B, V) of the tokens marked in seen (B, V) bool are divided by `penalty` when
    positive, multiplied when negative. Returns new logits (B, V)."""
    return torch.where(seen, torch.where(logits < 0, logits * penalty, logits / penalty), logits)


@torch.no_grad()
def generate(model, batch, max_new_tokens: int = 128, *, temperature: float = 0.0, top_p: float = 1.0,
             seeds=None, penalty: float = 1.0, penalize=None, span_style: str = "seconds", use_cache: bool = True):
    """Batched decoding from prompts (a collated batch without responses). Greedy at temperature 0,
    else sampling (temperature, top_p) with one generator per sample seeded from `seeds` (B ints,
    default 0..B-1): a sample draws the same tokens in any batch. Each emitted <evi> gets the span
    chosen from its similarity over the frames (evidence.select_interval), and its next input
    embedding is raised by the mean layer-`inject_layer` video state over that span (unless
    cfg.semantic_capture is off). Stops a sample
    at <|end|>. penalty / penalize (B bools): the release's repetition penalty on those samples, over
    every token of the prompt and of the answer so far but the video placeholder and <evi>, applied
    before the temperature. use_cache=False recomputes the whole sequence at every step (a reference
    for tests). A sample also stops when it fills the LLM's context (cfg.llm_max_positions). Returns
    one dict per sample: text (each <evi> written by data.render in `span_style`), tokens, spans
    (seconds), probs: for each <evi>, sigmoid(similarity) over the sample's frames (what its span
    was chosen from), and stopped: "end" (<|end|>), "max_new_tokens" or "context".
    At cfg.evidence_level "frame" (ablation B1) each <evi> is one boundary: its frame is the argmax
    over the frames (probs: the softmax), it takes in that one frame's state, and the output pairs
    them (data.pair_boundaries): `spans` and `text` have one span per event, `probs` one row per <evi>."""
    cfg, tid = model.cfg, model.token_id
    ids = batch["input_ids"]
    B, dev = ids.shape[0], ids.device
    gens = [torch.Generator().manual_seed(int(x)) for x in (range(B) if seeds is None else seeds)]
    seen = _seen_tokens(model, batch, penalize) if penalty != 1.0 and penalize is not None and any(penalize) else None
    penalized = torch.tensor([False] * B if penalize is None else list(penalize), device=dev)
    prompt = model.encode_prompt(batch)
    hs = model.run(prompt.suffix, prompt.suf_mask, prompt.cache, prompt.pre_mask)
    last = prompt.columns((prompt.lengths - 1)[:, None])[:, 0] - prompt.P
    h_last, m_last = hs[-1][torch.arange(B), last], hs[cfg.match_layer][torch.arange(B), last]
    past = torch.cat([prompt.pre_mask, prompt.suf_mask], 1)
    # positions left in the LLM's context (the video placeholder became its frames' tokens)
    room = cfg.llm_max_positions - (prompt.lengths - 1 + prompt.frame_mask.sum(1))
    done, out_of_room = torch.zeros(B, dtype=torch.bool, device=dev), torch.zeros(B, dtype=torch.bool, device=dev)
    n_new = torch.zeros(B, dtype=torch.long, device=dev)  # tokens each sample has generated
    spans, probs, new_embs = [[] for _ in range(B)], [[] for _ in range(B)], []
    chosen, alive = [], []  # each step's tokens (B,) and which samples were still going, read back at the end
    n_frames = prompt.frame_mask.sum(1).tolist()
    for _ in range(max_new_tokens):
        logits = model.lm_head(h_last).float()
        if seen is not None:
            logits = torch.where(penalized[:, None], repetition_penalty(logits, seen, penalty), logits)
        tok = torch.where(done, model.tokenizer.pad_token_id, _choose(logits, temperature, top_p, gens))
        if seen is not None:
            seen[torch.arange(B, device=dev), tok] |= (tok != tid[EVI]) & ~done
        emb = model.decoder.embed_tokens(tok)
        is_evi, live = (tok == tid[EVI]) & ~done, ~done
        chosen.append(tok)
        alive.append(live)
        n_new += live
        done = done | (tok == tid[END])
        out_of_room = out_of_room | (~done & (n_new >= room))
        done = done | out_of_room
        # the step's one read by the host (greedy; sampling reads the probabilities too, to draw on the CPU)
        any_evi, finished = torch.stack([is_evi.any(), done.all()]).tolist()
        if any_evi:  # the paper's step: each new <evi> localizes its span and takes in its frames
            emb, span, p = localize_and_capture(model, prompt, m_last, emb, is_evi)
            rows, span, p = is_evi.nonzero()[:, 0].tolist(), span.tolist(), p.tolist()
            for i in rows:
                spans[i].append([v / cfg.fps for v in span[i]])
                probs[i].append(p[i][:n_frames[i]])
        if finished:
            break
        new_embs.append(emb)
        past = torch.cat([past, live[:, None]], 1)
        if use_cache:
            hs = model.run(emb[:, None], live[:, None], prompt.cache, past[:, :-1])
        else:
            hs = _from_scratch(model, batch, past, new_embs)
        h_last, m_last = hs[-1][:, -1], hs[cfg.match_layer][:, -1]
    return _answers(model, chosen, alive, spans, probs, out_of_room.tolist(), span_style=span_style)


def localize_and_capture(model, prompt, match_state, emb, is_evi):
    """The evidence token at inference, for the samples whose new token is an <evi> (is_evi (B,)):
    localize: the similarity of its evi_head feature (of match_state (B, D), the layer-match_layer
    state that predicted it) with each frame's frm_head feature, and the span chosen from it
    (evidence.select_interval; at cfg.evidence_level "frame", ablation B1, one boundary frame: the
    argmax); capture: its next input embedding emb (B, D) raised by the mean layer-inject_layer
    video state over that span (unless cfg.semantic_capture is off). Returns (emb (B, D), span
    (B, 2) in frames, p (B, T): sigmoid(similarity), at "frame" level the softmax over the frames)."""
    cfg = model.cfg
    sim = evidence.similarity(model.evi_head(match_state)[:, None], prompt.frm)  # (B, 1, T)
    if cfg.evidence_level == "frame":
        span = evidence.select_frame(sim, prompt.frame_mask)
    else:
        span = evidence.select_interval(sim, cfg.select_ratio, prompt.frame_mask)  # (B, 1, 2)
    if cfg.semantic_capture:
        emb = emb + evidence.pool_evidence(prompt.inject, span)[:, 0] * is_evi[:, None]
    row = sim[:, 0].float()
    p = row.masked_fill(~prompt.frame_mask, -torch.inf).softmax(-1) if cfg.evidence_level == "frame" else row.sigmoid()
    return emb, span[:, 0], p


def _seen_tokens(model, batch, penalize):
    """(B, V) bool: the prompt tokens each sample's repetition penalty counts (all but padding, the
    video placeholder and <evi>); generate adds each new token but <evi>."""
    ids, tid = batch["input_ids"], model.token_id
    seen = torch.zeros(len(ids), model.lm_head.weight.shape[0], dtype=torch.bool, device=ids.device)
    keep = batch["attention_mask"].bool() & (ids != tid[VIDEO]) & (ids != tid[EVI])
    rows = torch.arange(len(ids), device=ids.device)[:, None].expand_as(ids)
    seen[rows[keep], ids[keep]] = True
    return seen


def _from_scratch(model, batch, past, new_embs):
    """The no-cache reference path (use_cache=False, for tests): the prompt and every generated
    embedding (new_embs: (B, D) each) run again from nothing; past (B, P + S + n) marks the live
    columns. Returns the hidden states of the whole suffix."""
    prompt = model.encode_prompt(batch)
    gen_mask = past[:, prompt.P + prompt.suffix.shape[1]:]
    return model.run(torch.cat([prompt.suffix, torch.stack(new_embs, 1)], 1),
                     torch.cat([prompt.suf_mask, gen_mask], 1), prompt.cache, prompt.pre_mask)


def _answers(model, chosen, alive, spans, probs, out_of_room, *, span_style):
    """One dict per sample from the steps' tokens (chosen, alive: (B,) per step), the spans and
    probabilities of its <evi> and whether it filled the context (out_of_room)."""
    cfg, end = model.cfg, model.token_id[END]
    B = len(out_of_room)
    picked, went_on = (torch.stack(x, 1).tolist() if x else [[]] * B for x in (chosen, alive))
    out = []
    for i in range(B):
        tokens = [t for t, on in zip(picked[i], went_on[i]) if on]
        text = model.tokenizer.decode(tokens[:-1] if tokens and tokens[-1] == end else tokens, skip_special_tokens=False)
        if span_style == "release":  # the release strips the decoded text before writing the spans in
            text = text.strip()
        stopped = "end" if tokens and tokens[-1] == end else "context" if out_of_room[i] else "max_new_tokens"
        events = spans[i]
        if cfg.evidence_level == "frame":  # boundaries -> events: one <evi> and one span per (start, end) pair
            text, events = pair_boundaries(text, spans[i])
        out.append({"text": render(text, events, span_style, cfg.fps), "tokens": tokens, "spans": events,
                    "probs": probs[i], "stopped": stopped})
    return out


def _choose(logits, temperature, top_p, gens):
    """The next token of each row of logits (B, V): argmax at temperature 0, else a draw from row
    i's own generator gens[i] (on the CPU, so a seed means the same on any device)."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, -1)
    if top_p < 1:
        sp, si = probs.sort(-1, descending=True)
        keep = sp.cumsum(-1) - sp < top_p
        probs = torch.zeros_like(probs).scatter(-1, si, sp * keep)
    rows = probs.float().cpu()
    return torch.stack([torch.multinomial(rows[i], 1, generator=g)[0] for i, g in enumerate(gens)]).to(logits.device)
