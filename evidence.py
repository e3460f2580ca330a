"""Evidence tokens: grounding by similarity, soft targets, interval selection, evidence pooling.

Paper: "Evidence Token". Each <evi> token grounds one event: its hidden state is compared with every
frame feature (scaled dot product, one sigmoid per frame, no softmax over time), trained against soft
targets that are 1 inside the span and decay as alpha ** -distance outside it. At inference the span
is read off the per-frame probabilities (keep frames close to the peak, take the best contiguous
run), and the frames of that span are mean-pooled back into the token so that it carries what the
event shows (semantic capture).

    similarity(evi, frames)                  (B, K, d), (B, T, d) -> logits (B, K, T)
    soft_targets(spans, T, alpha)            (B, K, 2) inclusive frame spans -> targets (B, K, T)
    select_interval(logits, ratio, mask)     logits (B, K, T) -> inclusive frame spans (B, K, 2)
    pool_evidence(states, spans, mask)       (B, T, D), (B, K, 2) -> span means (B, K, D)
    select_frame(logits, mask)               logits (B, K, T) -> the argmax frame [t, t] (B, K, 2)
                                             (frame-level evidence, ablation B1)

Spans are tensors of inclusive frame indices [s, e] (long); soft_targets also takes float positions.
"""
from __future__ import annotations

import math

import torch

EVI, EVI_END = "<evi>", "</evi>"  # the evidence token, and the end of the evidence part (stage 1)


def similarity(evi: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
    """Grounding logits: evi (B, K, d), frames (B, T, d) -> (B, K, T) = evi . frame / sqrt(d).

    The probability that frame t belongs to event k is sigmoid(logits[:, k, t]); frames are scored
    independently, so an event may cover many frames.
    """
    if evi.dim() != 3 or frames.dim() != 3 or evi.shape[0] != frames.shape[0] or evi.shape[-1] != frames.shape[-1]:
        raise ValueError(f"expected evi (B, K, d) and frames (B, T, d), got {tuple(evi.shape)} and {tuple(frames.shape)}")
    return evi @ frames.transpose(1, 2) / math.sqrt(evi.shape[-1])


def soft_targets(spans: torch.Tensor, num_frames: int, alpha: float) -> torch.Tensor:
    """Soft grounding targets: spans (B, K, 2) inclusive [s, e] in frames -> (B, K, num_frames) float.

    y_t = alpha ** -d_t (the model's alpha: D2VLMConfig.alpha), with d_t = 0 inside [s, e] and the
    distance in frames to the nearer end outside it. A point span [5, 5] with alpha = 2 gives ... 0.25,
    0.5, 1, 0.5, 0.25 ... around frame 5.
    Spans are long frame indices (SFT), or float frame positions (FPO: times as written x fps), whose
    distances are fractional: [2.4, 5.6] gives frame 2 the target alpha ** -0.4.
    """
    if alpha <= 1:
        raise ValueError(f"alpha must be > 1 for the targets to decay away from the span, got {alpha}")
    s, e = spans[..., :1], spans[..., 1:]  # (B, K, 1) each
    if (s > e).any():
        raise ValueError("soft_targets: a span has s > e")
    t = torch.arange(num_frames, device=spans.device)
    dist = (s - t).clamp(min=0) + (t - e).clamp(min=0)  # (B, K, T); at most one term is non-zero
    return torch.pow(alpha, -dist.to(torch.get_default_dtype()))


def select_interval(logits: torch.Tensor, ratio: float, frame_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Inference-time span of each evidence token: logits (B, K, T), frame_mask (B, T) bool -> (B, K, 2) long.

    p = sigmoid(logits); keep the valid frames with p >= ratio * max p (max over valid frames only;
    the model's ratio: D2VLMConfig.select_ratio); split the kept frames into contiguous runs; return
    the inclusive [s, e] of the run with the highest mean p (ties: the earliest run). Padded frames
    (frame_mask False) are never kept and also break runs. Flat scores keep every frame: one run over
    all valid frames.
    """
    if not 0 <= ratio <= 1:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")
    B, K, T = logits.shape
    # at least fp32 so that run means of bf16 logits do not tie by rounding
    p = logits.detach().to(torch.promote_types(logits.dtype, torch.float32)).sigmoid()
    if frame_mask is None:
        valid = torch.ones(B, 1, T, dtype=torch.bool, device=logits.device)
    else:
        if frame_mask.shape != (B, T):
            raise ValueError(f"frame_mask must be (B, T) = {(B, T)}, got {tuple(frame_mask.shape)}")
        valid = frame_mask.to(device=logits.device, dtype=torch.bool)[:, None, :]  # (B, 1, T)
    if not valid.any(-1).all():
        raise ValueError("select_interval: a video has no valid frames")

    pmax = p.masked_fill(~valid, float("-inf")).amax(-1, keepdim=True)  # (B, K, 1)
    keep = valid & (p >= ratio * pmax)  # (B, K, T); the argmax frame is always kept

    # number the runs 1, 2, ... along time; frames not kept go to bin 0
    prev = torch.nn.functional.pad(keep[..., :-1], (1, 0), value=False)
    run = torch.cumsum(keep & ~prev, dim=-1) * keep  # (B, K, T) long

    # mean p of each run via scatter_add into T + 1 bins (there are at most ceil(T / 2) runs)
    total = torch.zeros(B, K, T + 1, dtype=p.dtype, device=p.device).scatter_add_(-1, run, p * keep)
    count = torch.zeros(B, K, T + 1, dtype=p.dtype, device=p.device).scatter_add_(-1, run, keep.to(p.dtype))
    mean = (total / count.clamp(min=1)).masked_fill(count == 0, float("-inf"))
    mean[..., 0] = float("-inf")  # bin 0 is "not kept", never a run
    best = mean.argmax(-1, keepdim=True)  # (B, K, 1); argmax returns the first maximum -> earliest run

    t = torch.arange(T, device=logits.device)
    member = run == best  # (B, K, T); best >= 1, so this is exactly the winning run
    s = t.masked_fill(~member, T).amin(-1)
    e = t.masked_fill(~member, -1).amax(-1)
    return torch.stack([s, e], dim=-1)


def select_frame(logits: torch.Tensor, frame_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Frame-level evidence (ablation B1): the highest-scoring valid frame of each token, as a point
    span [t, t]: logits (B, K, T), frame_mask (B, T) bool -> (B, K, 2) long (ties: the earliest frame)."""
    if frame_mask is not None:
        logits = logits.masked_fill(~frame_mask.to(device=logits.device, dtype=torch.bool)[:, None, :], float("-inf"))
    t = logits.argmax(-1)
    return torch.stack([t, t], dim=-1)


def pool_evidence(states: torch.Tensor, spans: torch.Tensor, frame_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of the frame states of each span: states (B, T, D), spans (B, K, 2) long inclusive -> (B, K, D).

    This is what an <evi> token takes in from its frames (semantic capture). Spans must lie in
    [0, T - 1] (the caller clamps them to the valid frames); frame_mask (B, T) bool, if given, drops
    padded frames from the mean. Keeps the dtype of states; differentiable w.r.t. states.
    """
    B, T, D = states.shape
    if spans.dim() != 3 or spans.shape[0] != B or spans.shape[-1] != 2:
        raise ValueError(f"spans must be (B, K, 2) with B = {B}, got {tuple(spans.shape)}")
    s, e = spans[..., :1], spans[..., 1:]  # (B, K, 1) each
    if (s > e).any():
        raise ValueError("pool_evidence: a span has s > e")
    if (s < 0).any() or (e >= T).any():
        raise ValueError(f"pool_evidence: a span lies outside frames [0, {T - 1}]")
    t = torch.arange(T, device=states.device)
    member = (t >= s) & (t <= e)  # (B, K, T)
    if frame_mask is not None:
        member = member & frame_mask.to(device=states.device, dtype=torch.bool)[:, None, :]
    count = member.sum(-1, keepdim=True)  # (B, K, 1)
    if (count == 0).any():
        raise ValueError("pool_evidence: a span covers no valid frame")
    weight = member.to(states.dtype) / count.to(states.dtype)  # (B, K, T), rows sum to 1
    return weight @ states
