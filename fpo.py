"""Factorized Preference Optimization. Paper: "Factorized Preference Optimization"; docs/design.md#fpo.

A response's log-probability has two factors: its tokens, and where its <evi> tokens ground.

    log p_g(R)  = sum_k sum_t log(y_kt * sigmoid(s_kt) + (1 - y_kt) * (1 - sigmoid(s_kt)) + 1e-10)
                  (y: the soft targets of the response's spans as written, in frames but not
                  rounded to them: frames t with s_k <= t <= e_k get 1, the others alpha ** -(the
                  distance to the span, fractional for a fractional time), as the paper's p_g
                  and the release read them; with hard 0/1 targets this is the log of the paper's
                  product over frames)
    log pi(R)   = sum of the response's token log-probs (no length normalisation) + log p_g(R)
    L_FPO       = -log sigmoid(beta * [(log pi(R+) - log pi_ref(R+)) - (log pi(R-) - log pi_ref(R-))])

Without a reference (the released recipe, `--ref none`) the pi_ref terms are 0.

    grounding_logprob(sim, targets, mask)            -> (B,)
    response_logprob(out, batch, branch, alpha)      -> (B, 2) [text, grounding] of one branch
    fpo_loss(chosen, rejected, ref_chosen, ref_rejected, *, beta) -> per-pair losses (B,), rewards (B, 2) x 2
    reference_logprobs(model, pairs, ...)            -> (N, 4) the reference's factors, computed once
    objective(out, batch, cfg, ref)                  the FPO stage's loss: SFT on the chosen + w_fpo * L_FPO
"""
from __future__ import annotations

import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

import evidence
import losses
from batches import IGNORE

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


FACTORS = ("text", "grounding")  # the two factors of log pi(R), in the order of every (B, 2) tensor here


def response_logprob(out: dict, batch: dict, branch: int, alpha: float) -> torch.Tensor:
    """The two factors of log pi(R) for one branch of a packed preference batch (batches.collate of
    pairs; 1 = chosen, 2 = rejected), from D2VLM.forward's output.

    Shape: (B, 2) = [text, grounding]; their sum over the last dim is log pi(R)."""
    lab = batch["labels"].masked_fill(batch["branch"] != branch, IGNORE)
    text = token_logprobs(out["logits"], lab, batch["prev"]).sum(1)
    y = evidence.soft_targets(batch["answer_times"].clamp(min=0), out["sim"].shape[-1], alpha)  # times as written
    rows = out["evi_mask"] & (out["evi_branch"] == branch)
    mask = rows[..., None] & out["frame_mask"][:, None, :]
    return torch.stack([text, grounding_logprob(out["sim"], y, mask)], 1)


def policy_logprobs(out: dict, batch: dict, alpha: float):
    """(chosen, rejected) factors of log pi for a packed preference batch, each (B, 2)."""
    return response_logprob(out, batch, 1, alpha), response_logprob(out, batch, 2, alpha)


def fpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor | None = None,
             reference_rejected: torch.Tensor | None = None, *, beta: float):
    """The FPO loss of B preference pairs: DPO's loss on log-probs that factor into text and grounding.

    Shape:
        policy_chosen, policy_rejected        (B, 2) log-prob factors [text, grounding] under the policy
        reference_chosen, reference_rejected  (B, 2) the same under the reference, or None (reference-free,
                                              as released: 0)
        returns losses (B,), chosen_rewards (B, 2), rejected_rewards (B, 2): beta * (policy - reference)
        per factor; a pair's reward is the sum over the last dim. beta: the model's is D2VLMConfig.beta.
    """
    chosen_rewards = beta * (policy_chosen - (0.0 if reference_chosen is None else reference_chosen))
    rejected_rewards = beta * (policy_rejected - (0.0 if reference_rejected is None else reference_rejected))
    per_pair = -F.logsigmoid(chosen_rewards.sum(1) - rejected_rewards.sum(1))
    return per_pair, chosen_rewards, rejected_rewards


# The logged figures, named as TRL names them, each from (policy chosen, policy rejected, chosen
# rewards, rejected rewards) = (logp_c, logp_r, reward_c, reward_r), all (B, 2); plus the text and
# grounding parts of each.
_FIGURES = {
    "rewards/chosen": lambda logp_c, logp_r, reward_c, reward_r: reward_c.sum(1),
    "rewards/rejected": lambda logp_c, logp_r, reward_c, reward_r: reward_r.sum(1),
    "rewards/accuracies": lambda logp_c, logp_r, reward_c, reward_r: (reward_c.sum(1) > reward_r.sum(1)).float(),
    "rewards/margins": lambda logp_c, logp_r, reward_c, reward_r: reward_c.sum(1) - reward_r.sum(1),
    "logps/chosen": lambda logp_c, logp_r, reward_c, reward_r: logp_c.sum(1),
    "logps/rejected": lambda logp_c, logp_r, reward_c, reward_r: logp_r.sum(1),
    **{f"logps/{side}_{f}": (lambda logp_c, logp_r, reward_c, reward_r, i=i, s=side:
                              (logp_c if s == "chosen" else logp_r)[:, i])
       for i, f in enumerate(FACTORS) for side in ("chosen", "rejected")},
    **{f"rewards/margins_{f}": (lambda logp_c, logp_r, reward_c, reward_r, i=i: reward_c[:, i] - reward_r[:, i])
       for i, f in enumerate(FACTORS)},
}
METRICS = ("fpo", *_FIGURES)  # what fpo.objective adds to the SFT terms


def figures(policy_chosen, policy_rejected, chosen_rewards, rejected_rewards) -> dict:
    """The _FIGURES of a batch, each the mean over its pairs (detached scalars)."""
    args = (policy_chosen, policy_rejected, chosen_rewards, rejected_rewards)
    return {k: fn(*args).mean().detach() for k, fn in _FIGURES.items()}


@torch.no_grad()
def reference_logprobs(model, ds, collate, cfg, proc, autocast) -> torch.Tensor:
    """The log-prob factors of every pair of `ds` under `model` (the SFT model FPO starts from), no
    dropout. Shape: (len(ds), 4) float64 = [chosen text, chosen grounding, rejected text, rejected
    grounding]. proc: this process of the run (support.rundir.Proc); each rank computes every
    world-th pair, then the ranks sum their tables."""
    rank, world, device = proc.rank, proc.world, proc.device
    was = model.training
    model.eval()
    table = torch.zeros(len(ds), 4, dtype=torch.float64, device=device)
    mine, failed = list(range(rank, len(ds), world)), []
    for i in range(0, len(mine), cfg.batch_size):
        batch = collate([ds[j] for j in mine[i:i + cfg.batch_size]])
        failed += batch.pop("failed", [])  # videos broken since the pre-flight check
        if "index" not in batch:
            continue
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast:
            out = model(batch)
        table[batch["index"]] = torch.cat(policy_logprobs(out, batch, cfg.alpha), 1).double()
    for message in failed:
        print(f"skipped: {message}", file=sys.stderr)
    if failed:
        print(f"{len(failed)} pairs have no reference log-probs (their video failed to read): their reference terms "
              "are 0, as under --ref none, should the video read later", file=sys.stderr)
    if world > 1:
        dist.all_reduce(table)
    model.train(was)
    return table


def objective(out: dict, batch: dict, cfg, ref: torch.Tensor | None = None) -> dict:
    """The FPO-stage loss of a packed preference batch: losses.sft_objective on the chosen response
    + cfg.w_fpo * the mean FPO loss. ref: None (reference-free, as released) or the table (N, 4) of
    reference_logprobs, indexed by batch["index"]. Returns "loss" (differentiable), the SFT terms of
    the chosen response ("sft", "gnd", "cons") and the METRICS, detached."""
    chosen_rows = out["evi_branch"] == 1
    out_c = {**out, "evi_mask": out["evi_mask"] & chosen_rows}
    batch_c = {"labels": batch["labels"].masked_fill(batch["branch"] != 1, IGNORE),
               "answer_spans": batch["answer_spans"].masked_fill(~chosen_rows[..., None], -1)}
    terms = losses.sft_objective(out_c, batch_c, cfg)
    policy_chosen, policy_rejected = policy_logprobs(out, batch, cfg.alpha)
    ref_chosen = ref_rejected = None
    if ref is not None:
        ref_rows = ref[batch["index"]].to(policy_chosen.device)
        ref_chosen, ref_rejected = ref_rows[:, :2], ref_rows[:, 2:]
    per_pair, chosen_rewards, rejected_rewards = fpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected,
                                                          beta=cfg.beta)
    loss = per_pair.mean()
    return {**terms, "loss": terms["loss"] + cfg.w_fpo * loss, "fpo": loss.detach(),
            **figures(policy_chosen, policy_rejected, chosen_rewards, rejected_rewards)}
