"""Decoding: batched generation with a KV cache and evidence injection. Paper: "Evidence Token"
(inference: each generated <evi> picks its span and takes in its frames).

    generate(model, batch, max_new_tokens, temperature, top_p)   one dict per sample: text, tokens, spans, probs
"""
from __future__ import annotations

import torch

import evidence
from data import END, render
from evidence import EVI


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
    pr = model.encode_prompt(batch)
    suffix, suf_mask = pr.suffix, pr.suf_mask
    hs = model.run(suffix, suf_mask, pr.cache, pr.pre_mask)
    last = pr.col.gather(1, (pr.lengths - 1)[:, None])[:, 0] - pr.P
    h_last = hs[-1][torch.arange(B), last]
    m_last = hs[cfg.match_layer][torch.arange(B), last]
    past = torch.cat([pr.pre_mask, suf_mask], 1)
    done = torch.zeros(B, dtype=torch.bool, device=suffix.device)
    tokens, spans, probs, new_embs = [[] for _ in range(B)], [[] for _ in range(B)], [[] for _ in range(B)], []
    n_frames = pr.frame_mask.sum(1).tolist()
    pad = model.tokenizer.pad_token_id
    for _ in range(max_new_tokens):
        logits = model.lm_head(h_last).float()
        tok = _choose(logits, temperature, top_p, generator)
        tok = torch.where(done, pad, tok)
        emb = model.decoder.embed_tokens(tok)
        is_evi = (tok == tid[EVI]) & ~done
        if is_evi.any():
            sim = evidence.similarity(model.evi_head(m_last)[:, None], pr.frm)
            span = evidence.select_interval(sim, cfg.select_ratio, pr.frame_mask)  # (B, 1, 2)
            emb = emb + evidence.pool_evidence(pr.inject, span)[:, 0] * is_evi[:, None]
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
