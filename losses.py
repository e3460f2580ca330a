"""The SFT objective. Paper: "Loss & Training"; docs/design.md#sft-objective.

    L = w_sft * L_sft + w_gnd * L_gnd + w_cons * L_cons        (1, 10, 10 in D2VLMConfig)

    L_sft   token cross-entropy over the response (the prompt is masked), <evi>, </evi>, <|end|> included
    L_gnd   BCE-with-logits between each answer <evi>'s similarity to every frame and its soft targets
            alpha ** -distance, averaged over the 2K x T entries of a sample (stage 1 and stage 2)
    L_cons  L1 between the evi_head features of the k-th stage-1 and the k-th stage-2 <evi>,
            mean over the feature dimension and the K pairs

The ablations (config.response_format, evidence_level): L_cons applies to the factorized format
only (the coupled and text formats have no second <evi> per event to agree with); at frame level
(B1) L_gnd is `grounding_ce`, a softmax over the frames against alpha ** -|t - t*| normalised.

Each term is a mean per sample first, then a mean over the samples it applies to (that have
response tokens / answer <evi> / stage-1-stage-2 pairs), so every sample weighs the same whatever
its length. A weight of 0 switches a term off (it still shows in the returned figures).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import evidence
from batches import IGNORE


def token_ce(logits: torch.Tensor, labels: torch.Tensor):
    """logits (B, L, V) next-token logits aligned with labels (B, L) (IGNORE = not a target).
    Returns the per-sample mean cross-entropy of tokens 1..L-1 (B,) and which samples have targets (B,)."""
    tgt = labels[:, 1:]
    ce = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), tgt.clamp(min=0), reduction="none")  # (B, L-1)
    m = tgt != IGNORE
    n = m.sum(1)
    return (ce * m).sum(1) / n.clamp(min=1), n > 0


def grounding_bce(sim: torch.Tensor, spans: torch.Tensor, frame_mask: torch.Tensor, alpha: float):
    """sim (B, N, T) logits of N answer <evi> over T frames; spans (B, N, 2) inclusive frame spans,
    -1 where a row is padding; frame_mask (B, T). Returns the per-sample mean BCE over the real
    (<evi>, frame) entries (B,) and which samples have any (B,)."""
    valid = (spans[..., 0] >= 0)[..., None] & frame_mask[:, None, :]  # (B, N, T)
    y = evidence.soft_targets(spans.clamp(min=0), sim.shape[-1], alpha)
    bce = F.binary_cross_entropy_with_logits(sim.float(), y.float(), reduction="none")
    n = valid.sum((1, 2))
    return (bce * valid).sum((1, 2)) / n.clamp(min=1), n > 0


def grounding_ce(sim: torch.Tensor, spans: torch.Tensor, frame_mask: torch.Tensor, alpha: float):
    """Frame-level grounding (ablation B1, E.T.Chat-style): sim (B, N, T) logits of N boundary <evi>,
    spans (B, N, 2) their frames [t*, t*] (-1: padding), frame_mask (B, T). Each <evi> is a softmax
    over the sample's frames, trained by cross-entropy against q_t = alpha ** -|t - t*| / sum over
    the frames. Returns the per-sample mean over its <evi> (B,) and which samples have any (B,)."""
    rows = spans[..., 0] >= 0  # (B, N)
    if (spans[..., 0] != spans[..., 1])[rows].any():
        raise ValueError("grounding_ce: frame-level targets are single frames [t, t]")
    valid = frame_mask[:, None, :].expand_as(sim)
    q = evidence.soft_targets(spans.clamp(min=0), sim.shape[-1], alpha).float() * valid
    q = q / q.sum(-1, keepdim=True).clamp(min=1e-12)
    logp = torch.log_softmax(sim.float().masked_fill(~valid, float("-inf")), -1)
    ce = -(q * logp.masked_fill(~valid, 0)).sum(-1)  # (B, N)
    n = rows.sum(1)
    return (ce * rows).sum(1) / n.clamp(min=1), n > 0


def consistency_l1(feats: torch.Tensor, evi_mask: torch.Tensor):
    """feats (B, N, d) evi_head features of the N = 2K answer <evi> (stage 1 first, then stage 2),
    evi_mask (B, N). Returns the per-sample mean over k of mean_d |f_k - f_{K+k}| (B,) and which
    samples have pairs (B,)."""
    n = evi_mask.sum(1)
    if (n % 2).any():
        raise ValueError("consistency_l1: a sample has an odd number of answer <evi> (expected K in stage 1 and K in stage 2)")
    K = n // 2
    k = torch.arange(int(K.max()) if K.numel() else 0, device=feats.device)[None]  # (1, Kmax)
    pair = k < K[:, None]
    first = feats.gather(1, k.expand(len(K), -1)[..., None].expand(-1, -1, feats.shape[-1]))
    second = feats.gather(1, (k + K[:, None]).clamp(max=feats.shape[1] - 1)[..., None].expand(-1, -1, feats.shape[-1]))
    l1 = (first - second).float().abs().mean(-1)  # (B, Kmax)
    return (l1 * pair).sum(1) / K.clamp(min=1), K > 0


def _mean_over(per_sample, has):
    # x * 0 rather than a constant keeps every head in the graph (DDP expects all trainable grads)
    return (per_sample * has).sum() / has.sum().clamp(min=1)


def sft_objective(out: dict, batch: dict, cfg) -> dict:
    """out: D2VLM.forward's dict; batch: batches.collate's. Returns {"loss": the weighted sum (scalar,
    differentiable), "sft", "gnd", "cons": the unweighted terms (detached scalars)}."""
    sft = _mean_over(*token_ce(out["logits"], batch["labels"]))
    ground = grounding_ce if cfg.evidence_level == "frame" else grounding_bce
    gnd = _mean_over(*ground(out["sim"], batch["answer_spans"], out["frame_mask"], cfg.alpha))
    if cfg.response_format == "factorized":
        cons = _mean_over(*consistency_l1(out["evi_feats"], out["evi_mask"]))
    else:  # nothing to keep consistent; x * 0 keeps evi_head in the graph
        cons = out["evi_feats"].float().sum() * 0
    loss = cfg.w_sft * sft + cfg.w_gnd * gnd + cfg.w_cons * cons
    return {"loss": loss, "sft": sft.detach(), "gnd": gnd.detach(), "cons": cons.detach()}
