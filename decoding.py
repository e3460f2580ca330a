"""Decoding: batched generation with a KV cache and evidence injection. Paper: "Evidence Token"
(inference: each generated <evi> picks its span and takes in its frames).

    generate(model, batch, max_new_tokens, temperature, ...)   one dict per sample: text, tokens, spans, probs
    DECODINGS                 the named protocols: "greedy" (ours) and "release" (the D2VLM release's,
                              shared/upstream-facts.md §3: sampling at 0.2, repetition penalty 1.2 on
                              multiple choice, 2048 new tokens, its span text)
    repetition_penalty(...)   the release's penalty, as a pure function
"""
from __future__ import annotations

import torch

import evidence
from data import END, VIDEO, pair_boundaries, render
from evidence import EVI

DECODINGS = {
    "greedy": {"temperature": 0.0, "repetition_penalty": 1.0, "max_new_tokens": 256, "span_style": "seconds"},
    "release": {"temperature": 0.2, "repetition_penalty": 1.2, "max_new_tokens": 2048, "span_style": "release"},
}
DEFAULT = "greedy"  # evaluate.py's --decoding
PENALIZED_TASKS = ("rar", "eca", "rvq")  # the release penalizes repetition on multiple choice only


def repetition_penalty(logits, seen, penalty: float):
    """The release's penalty (as transformers' RepetitionPenaltyLogitsProcessor, once per distinct
    token): logits (B, V) of the tokens marked in seen (B, V) bool are divided by `penalty` when
    positive, multiplied when negative. Returns new logits (B, V)."""
    return torch.where(seen, torch.where(logits < 0, logits * penalty, logits / penalty), logits)


@torch.no_grad()
def generate(model, batch, max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
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
    B = batch["input_ids"].shape[0]
    gens = [torch.Generator().manual_seed(int(x)) for x in (range(B) if seeds is None else seeds)]
    penalized = torch.tensor([False] * B if penalize is None else list(penalize), device=batch["input_ids"].device)
    penalizing = penalty != 1.0 and penalize is not None and any(penalize)
    ids, each = batch["input_ids"], torch.arange(B, device=batch["input_ids"].device)
    if penalizing:  # the tokens each sample has seen, for the penalty
        seen = torch.zeros(B, model.lm_head.weight.shape[0], dtype=torch.bool, device=ids.device)
        keep = batch["attention_mask"].bool() & (ids != tid[VIDEO]) & (ids != tid[EVI])
        seen[each[:, None].expand_as(ids)[keep], ids[keep]] = True
    pr = model.encode_prompt(batch)
    suffix, suf_mask = pr.suffix, pr.suf_mask
    hs = model.run(suffix, suf_mask, pr.cache, pr.pre_mask)
    last = pr.col.gather(1, (pr.lengths - 1)[:, None])[:, 0] - pr.P
    h_last = hs[-1][torch.arange(B), last]
    m_last = hs[cfg.match_layer][torch.arange(B), last]
    past = torch.cat([pr.pre_mask, suf_mask], 1)
    done = torch.zeros(B, dtype=torch.bool, device=suffix.device)
    spans, probs, new_embs = [[] for _ in range(B)], [[] for _ in range(B)], []
    chosen, alive = [], []  # each step's tokens (B,) and which samples were still going, read back at the end
    n_frames = pr.frame_mask.sum(1).tolist()
    # positions left in the LLM's context (the video placeholder became n_frames tokens)
    room = cfg.llm_max_positions - (pr.lengths - 1 + pr.frame_mask.sum(1))
    full = torch.zeros(B, dtype=torch.bool, device=done.device)
    n_new = torch.zeros(B, dtype=torch.long, device=done.device)  # tokens each sample has generated
    pad = model.tokenizer.pad_token_id
    frame_level = cfg.evidence_level == "frame"
    for _ in range(max_new_tokens):
        logits = model.lm_head(h_last).float()
        if penalizing:
            logits = torch.where(penalized[:, None], repetition_penalty(logits, seen, penalty), logits)
        tok = _choose(logits, temperature, top_p, gens)
        tok = torch.where(done, pad, tok)
        if penalizing:
            seen[each, tok] |= (tok != tid[EVI]) & ~done
        emb = model.decoder.embed_tokens(tok)
        is_evi = (tok == tid[EVI]) & ~done
        live = ~done
        chosen.append(tok)
        alive.append(live)
        done = done | (tok == tid[END])
        n_new += live
        full = full | (~done & (n_new >= room))
        done = done | full
        # the step's one read by the host (greedy; sampling reads the probabilities too, to draw on the CPU)
        any_evi, finished = torch.stack([is_evi.any(), done.all()]).tolist()
        if any_evi:
            sim = evidence.similarity(model.evi_head(m_last)[:, None], pr.frm)
            if frame_level:  # one boundary frame: the argmax of the softmax over the frames
                span = evidence.select_frame(sim, pr.frame_mask)
            else:
                span = evidence.select_interval(sim, cfg.select_ratio, pr.frame_mask)  # (B, 1, 2)
            if cfg.semantic_capture:
                emb = emb + evidence.pool_evidence(pr.inject, span)[:, 0] * is_evi[:, None]
            row = sim[:, 0].float()
            p = row.masked_fill(~pr.frame_mask, -torch.inf).softmax(-1) if frame_level else row.sigmoid()
            rows, span, p = is_evi.nonzero()[:, 0].tolist(), span[:, 0].tolist(), p.tolist()
            for i in rows:
                spans[i].append([v / cfg.fps for v in span[i]])
                probs[i].append(p[i][:n_frames[i]])
        if finished:
            break
        new_embs.append(emb)
        if use_cache:
            hs = model.run(emb[:, None], live[:, None], pr.cache, past)
            past = torch.cat([past, live[:, None]], 1)
            h_last, m_last = hs[-1][:, 0], hs[cfg.match_layer][:, 0]
        else:  # recompute prefix and everything after it from scratch
            pr = model.encode_prompt(batch)
            past = torch.cat([past, live[:, None]], 1)
            gen_mask = past[:, pr.P + suffix.shape[1]:]
            hs = model.run(torch.cat([pr.suffix, torch.stack(new_embs, 1)], 1),
                           torch.cat([suf_mask, gen_mask], 1), pr.cache, pr.pre_mask)
            h_last, m_last = hs[-1][:, -1], hs[cfg.match_layer][:, -1]
    picked, went_on = (torch.stack(x, 1).tolist() if x else [[]] * B for x in (chosen, alive))
    tokens = [[t for t, on in zip(picked[i], went_on[i]) if on] for i in range(B)]
    full = full.tolist()
    out = []
    for i in range(B):
        toks = tokens[i][:-1] if tokens[i] and tokens[i][-1] == tid[END] else tokens[i]
        raw = model.tokenizer.decode(toks, skip_special_tokens=False)
        if span_style == "release":  # the release strips the decoded text before writing the spans in
            raw = raw.strip()
        stopped = "end" if tokens[i] and tokens[i][-1] == tid[END] else "context" if full[i] else "max_new_tokens"
        events = spans[i]
        if frame_level:  # boundaries -> events: one <evi> and one span per (start, end) pair
            raw, events = pair_boundaries(raw, spans[i])
        out.append({"text": render(raw, events, span_style, cfg.fps), "tokens": tokens[i], "spans": events,
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
