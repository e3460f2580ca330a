"""Factorized Preference Optimization. Paper: "Factorized Preference Optimization"; DESIGN.md §6.

A response's log-probability has two factors: its tokens, and where its <evi> tokens ground.

    log p_g(R)  = sum_k sum_t log(y_kt * sigmoid(s_kt) + (1 - y_kt) * (1 - sigmoid(s_kt)) + 1e-10)
                  (y: the soft targets of the response's spans; with hard 0/1 targets this is the
                  log of the paper's product over frames)
    log pi(R)   = sum of the response's token log-probs (no length normalisation) + log p_g(R)
    L_FPO       = -log sigmoid(beta * [(log pi(R+) - log pi_ref(R+)) - (log pi(R-) - log pi_ref(R-))])

Without a reference (the released recipe, `--ref none`) the pi_ref terms are 0.

    grounding_logprob(sim, targets, mask)            -> (B,)
    response_logprob(out, batch, branch, alpha)      -> {"text": (B,), "grounding": (B,)} of one branch
    fpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta) -> loss, TRL-named metrics
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import evidence
import losses
from data import IGNORE

EPS = 1e-10


def grounding_logprob(sim: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sim (B, N, T) logits, targets (B, N, T) in [0, 1], mask (B, N, T) bool (real <evi> x real frame)
    -> (B,) sum over the masked entries of log(y * p + (1 - y) * (1 - p) + 1e-10), p = sigmoid(sim)."""
    p = torch.sigmoid(sim.float())
    y = targets.float()
    return (torch.log(y * p + (1 - y) * (1 - p) + EPS) * mask).sum((1, 2))


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, prev: torch.Tensor | None = None) -> torch.Tensor:
    """logits (B, L, V) aligned with the input positions, labels (B, L) -> (B, L) log-prob of each
    labelled token (0 where IGNORE), read from the logits at prev[b, i] (default i - 1)."""
    B, L, V = logits.shape
    if prev is None:
        prev = (torch.arange(L, device=labels.device) - 1).expand(B, L)
    logp = torch.log_softmax(logits.float(), -1)
    take = labels != IGNORE
    idx = prev.clamp(min=0) * V + labels.clamp(min=0)
    return logp.reshape(B, L * V).gather(1, idx) * take


def response_logprob(out: dict, batch: dict, branch: int, alpha: float) -> dict:
    """The two factors of log pi(R) for one branch of a packed preference batch (data.collate of
    pairs; 1 = chosen, 2 = rejected), from D2VLM.forward's output. Returns {"text": (B,),
    "grounding": (B,)}; their sum is log pi(R)."""
    lab = batch["labels"].masked_fill(batch["branch"] != branch, IGNORE)
    text = token_logprobs(out["logits"], lab, batch["prev"]).sum(1)
    y = evidence.soft_targets(batch["answer_spans"].clamp(min=0), out["sim"].shape[-1], alpha)
    rows = out["evi_mask"] & (out["evi_branch"] == branch)
    mask = rows[..., None] & out["frame_mask"][:, None, :]
    return {"text": text, "grounding": grounding_logprob(out["sim"], y, mask)}


def fpo_loss(chosen: dict, rejected: dict, ref_chosen: dict | None = None, ref_rejected: dict | None = None,
             beta: float = 0.1):
    """chosen / rejected (and the optional reference values): {"text": (B,), "grounding": (B,)}.
    Returns the mean FPO loss (scalar) and metrics named as TRL names them: rewards/chosen,
    rewards/rejected, rewards/accuracies, rewards/margins, logps/chosen, logps/rejected, plus the
    text and grounding parts of each (logps/chosen_text, ..., rewards/margins_grounding)."""
    zero = {"text": 0.0, "grounding": 0.0}
    rc, rr = ref_chosen or zero, ref_rejected or zero
    part = {}
    for f in ("text", "grounding"):
        part[f] = (beta * (chosen[f] - rc[f]), beta * (rejected[f] - rr[f]))
    r_c = part["text"][0] + part["grounding"][0]
    r_r = part["text"][1] + part["grounding"][1]
    loss = -F.logsigmoid(r_c - r_r).mean()
    m = {"rewards/chosen": r_c.mean(), "rewards/rejected": r_r.mean(),
         "rewards/accuracies": (r_c > r_r).float().mean(), "rewards/margins": (r_c - r_r).mean(),
         "logps/chosen": (chosen["text"] + chosen["grounding"]).mean(),
         "logps/rejected": (rejected["text"] + rejected["grounding"]).mean()}
    for f in ("text", "grounding"):
        m[f"logps/chosen_{f}"] = chosen[f].mean()
        m[f"logps/rejected_{f}"] = rejected[f].mean()
        m[f"rewards/margins_{f}"] = (part[f][0] - part[f][1]).mean()
    return loss, {k: v.detach() for k, v in m.items()}


METRICS = ("fpo", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected", "logps/chosen_text", "logps/rejected_text", "logps/chosen_grounding",
           "logps/rejected_grounding", "rewards/margins_text", "rewards/margins_grounding")


def policy_logprobs(out: dict, batch: dict, alpha: float):
    """(chosen, rejected) factors of log pi for a packed preference batch."""
    return response_logprob(out, batch, 1, alpha), response_logprob(out, batch, 2, alpha)


def objective(out: dict, batch: dict, cfg, ref: torch.Tensor | None = None) -> dict:
    """The FPO-stage loss of a packed preference batch: losses.sft_objective on the chosen response
    + cfg.w_fpo * fpo_loss. ref: None (reference-free, as released) or a table (N, 4) of reference
    [chosen text, chosen grounding, rejected text, rejected grounding] log-probs indexed by
    batch["index"]. Returns "loss" (differentiable), the SFT terms of the chosen response ("sft",
    "gnd", "cons") and "fpo" + the METRICS, detached."""
    chosen_rows = out["evi_branch"] == 1
    out_c = {**out, "evi_mask": out["evi_mask"] & chosen_rows}
    batch_c = {"labels": batch["labels"].masked_fill(batch["branch"] != 1, IGNORE),
               "answer_spans": batch["answer_spans"].masked_fill(~chosen_rows[..., None], -1)}
    terms = losses.sft_objective(out_c, batch_c, cfg)
    pc, pr = policy_logprobs(out, batch, cfg.alpha)
    rc = rr = None
    if ref is not None:
        r = ref[batch["index"]].to(pc["text"].device)
        rc, rr = {"text": r[:, 0], "grounding": r[:, 1]}, {"text": r[:, 2], "grounding": r[:, 3]}
    loss, metrics = fpo_loss(pc, pr, rc, rr, cfg.beta)
    return {**terms, "loss": terms["loss"] + cfg.w_fpo * loss, "fpo": loss.detach(), **metrics}
