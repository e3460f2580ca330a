"""losses.py against independent numpy computations, and the weighting / switching of the terms."""
import dataclasses

import numpy as np
import pytest
import torch

import config
import losses
from batches import IGNORE


CFG = config.PRESETS["tiny"]


def np_sigmoid(x):
    return 1 / (1 + np.exp(-x))


def test_token_ce_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 7, 11))
    labels = rng.integers(0, 11, (3, 7))
    labels[0, :4] = IGNORE            # prompt
    labels[1, :] = IGNORE             # no targets at all
    labels[2, [0, 3, 6]] = IGNORE
    per, has = losses.token_ce(torch.tensor(logits), torch.tensor(labels))
    for b in range(3):
        terms = []
        for t in range(6):            # logits at t predict the token at t + 1
            y = labels[b, t + 1]
            if y != IGNORE:
                z = logits[b, t]
                terms.append(-(z[y] - np.log(np.exp(z).sum())))
        assert bool(has[b]) == bool(terms)
        assert per[b].item() == pytest.approx(np.mean(terms) if terms else 0.0, rel=1e-6)


def test_grounding_bce_matches_numpy():
    rng = np.random.default_rng(1)
    B, N, T, alpha = 3, 4, 9, 2.0
    sim = rng.normal(size=(B, N, T)) * 3
    spans = np.array([[[0, 2], [3, 3], [5, 8], [-1, -1]],
                      [[4, 6], [-1, -1], [-1, -1], [-1, -1]],
                      [[-1, -1]] * 4])
    frame_mask = np.ones((B, T), bool)
    frame_mask[1, 7:] = False         # a shorter video
    per, has = losses.grounding_bce(torch.tensor(sim), torch.tensor(spans), torch.tensor(frame_mask), alpha)
    for b in range(B):
        vals = []
        for k in range(N):
            s, e = spans[b, k]
            if s < 0:
                continue
            for t in range(T):
                if not frame_mask[b, t]:
                    continue
                d = 0 if s <= t <= e else min(abs(t - s), abs(t - e))
                y, p = alpha ** -d, np_sigmoid(sim[b, k, t])
                vals.append(-(y * np.log(p) + (1 - y) * np.log(1 - p)))
        assert bool(has[b]) == bool(vals)
        assert per[b].item() == pytest.approx(np.mean(vals) if vals else 0.0, rel=1e-6)


def test_consistency_l1_matches_numpy():
    rng = np.random.default_rng(2)
    feats = rng.normal(size=(3, 6, 5))
    counts = [6, 2, 0]                # K = 3, 1, 0
    mask = np.array([[i < c for i in range(6)] for c in counts])
    per, has = losses.consistency_l1(torch.tensor(feats), torch.tensor(mask))
    for b, c in enumerate(counts):
        K = c // 2
        want = np.mean([np.abs(feats[b, k] - feats[b, K + k]).mean() for k in range(K)]) if K else 0.0
        assert bool(has[b]) == (K > 0)
        assert per[b].item() == pytest.approx(want, rel=1e-6)
    with pytest.raises(ValueError, match="odd number"):
        losses.consistency_l1(torch.tensor(feats), torch.tensor(np.array([[True] * 3 + [False] * 3] * 3)))


def fake_outputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    B, L, V, N, T, d = 3, 8, 13, 4, 6, 5
    labels = torch.randint(0, V, (B, L), generator=g)
    labels[:, :3] = IGNORE
    spans = torch.tensor([[[0, 1], [2, 4], [0, 1], [2, 4]], [[3, 3], [3, 3], [-1, -1], [-1, -1]], [[-1, -1]] * 4])
    out = {"logits": torch.randn(B, L, V, generator=g, requires_grad=True),
           "sim": torch.randn(B, N, T, generator=g, requires_grad=True),
           "evi_feats": torch.randn(B, N, d, generator=g, requires_grad=True),
           "evi_mask": spans[..., 0] >= 0, "frame_mask": torch.ones(B, T, dtype=torch.bool)}
    return out, {"labels": labels, "answer_spans": spans}


def test_sft_objective_weights_and_sample_means():
    out, batch = fake_outputs()
    terms = losses.sft_objective(out, batch, CFG)
    ce, _ = losses.token_ce(out["logits"], batch["labels"])
    gnd, _ = losses.grounding_bce(out["sim"], batch["answer_spans"], out["frame_mask"], CFG.alpha)
    cons, _ = losses.consistency_l1(out["evi_feats"], out["evi_mask"])
    # L_sft over all 3 samples; L_gnd and L_cons over the 2 samples that have spans (not diluted by the third)
    assert terms["sft"].item() == pytest.approx(ce.mean().item(), rel=1e-6)
    assert terms["gnd"].item() == pytest.approx(gnd[:2].mean().item(), rel=1e-6)
    assert terms["cons"].item() == pytest.approx(cons[:2].mean().item(), rel=1e-6)
    want = CFG.w_sft * terms["sft"] + CFG.w_gnd * terms["gnd"] + CFG.w_cons * terms["cons"]
    assert terms["loss"].item() == pytest.approx(want.item(), rel=1e-6)
    assert (CFG.w_sft, CFG.w_gnd, CFG.w_cons) == (1.0, 10.0, 10.0)


@pytest.mark.parametrize("off,grad_free", [("w_gnd", "sim"), ("w_cons", "evi_feats"), ("w_sft", "logits")])
def test_a_zero_weight_switches_a_term_off(off, grad_free):
    out, batch = fake_outputs()
    cfg = dataclasses.replace(CFG, **{off: 0.0})
    terms = losses.sft_objective(out, batch, cfg)
    terms["loss"].backward()
    assert out[grad_free].grad is not None and not out[grad_free].grad.any()  # in the graph, zero gradient
    others = {"sim", "evi_feats", "logits"} - {grad_free}
    assert all(out[k].grad.abs().sum() > 0 for k in others)
    assert terms[off[2:]].item() > 0  # still reported
