"""fpo.py: the grounding log-probability against the paper's product, token log-probs, the packed
chosen/rejected forward against two separate forwards, and the FPO loss."""
import math

import numpy as np
import pytest
import torch

import batches
import config
import data
import evidence
import fpo
import model
import synth
from batches import IGNORE
from data import EVI, EVI_END


CFG = config.PRESETS["tiny"]


def test_grounding_logprob_hard_targets_is_the_papers_product():
    rng = np.random.default_rng(0)
    B, K, T = 2, 3, 8
    sim = rng.normal(size=(B, K, T)) * 2
    spans = np.array([[[1, 3], [5, 5], [0, 7]], [[2, 6], [0, 0], [-1, -1]]])
    hard = np.zeros((B, K, T))
    for b in range(B):
        for k in range(K):
            s, e = spans[b, k]
            if s >= 0:
                hard[b, k, s:e + 1] = 1
    mask = np.broadcast_to((spans[..., :1] >= 0), (B, K, T)).copy()
    mask[1, :, 7] = False  # a padded frame
    got = fpo.grounding_logprob(torch.tensor(sim), torch.tensor(hard), torch.tensor(mask))
    for b in range(B):
        prod = 1.0
        for k in range(K):
            for t in range(T):
                if mask[b, k, t]:
                    p = 1 / (1 + math.exp(-sim[b, k, t]))
                    prod *= p if hard[b, k, t] else 1 - p  # p_g = prod_t (sim if s <= t <= e else 1 - sim)
        assert got[b].item() == pytest.approx(math.log(prod), rel=1e-5)
    # soft targets: the mixture y p + (1 - y)(1 - p) per entry
    y = rng.uniform(size=(B, K, T))
    p = 1 / (1 + np.exp(-sim))
    want = (np.log(y * p + (1 - y) * (1 - p) + 1e-10) * mask).sum((1, 2))
    assert fpo.grounding_logprob(torch.tensor(sim), torch.tensor(y), torch.tensor(mask)).numpy() == pytest.approx(want, rel=1e-5)


def test_token_logprobs_follow_prev():
    rng = np.random.default_rng(1)
    logits = torch.tensor(rng.normal(size=(1, 6, 5)))
    labels = torch.tensor([[IGNORE, IGNORE, 3, 1, 4, 0]])
    prev = torch.tensor([[0, 0, 1, 2, 1, 4]])  # token 4 follows position 1 (a second branch)
    got = fpo.token_logprobs(logits, labels, prev)[0]
    lp = torch.log_softmax(logits[0].float(), -1)
    want = [0, 0, lp[1, 3], lp[2, 1], lp[1, 4], lp[4, 0]]
    assert got.tolist() == pytest.approx([float(w) for w in want], rel=1e-6)
    default = fpo.token_logprobs(logits, labels)[0]
    assert default[4].item() == pytest.approx(lp[3, 4].item(), rel=1e-6)


def clip(n, seed):
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(0, 255, (n, 3, CFG.image_size, CFG.image_size), dtype=np.uint8))


def test_packed_pair_equals_two_separate_forwards():
    torch.manual_seed(0)
    m = model.build_model(CFG).eval()
    dvc = {"task": "dvc", "duration": 14.0, "prompt": f"Describe the events after {EVI}.",
           "question_spans": [[0, 1]], "question_frames": [[0, 1]], "spans": [[2, 4], [7, 11]],
           "response": f"{EVI}{EVI}{EVI_END}{EVI} seconds, a red square grows.\n{EVI} seconds, a blue circle blinks."}
    tvg = {"task": "tvg", "duration": 9.0, "prompt": "When does the green triangle appear?", "question_spans": [],
           "question_frames": [], "spans": [[3, 6]], "response": f"{EVI}{EVI_END}The event happens in {EVI} seconds."}
    rng = np.random.default_rng(0)
    pairs = []
    for ev, kind, n in ((dvc, "delete", 14), (tvg, "shift", 9), (dvc, "tamper", 14)):
        ev = {**ev, "frames": data.to_frames(ev["spans"])}
        pairs.append({"evidence": {**ev, "rejected": synth.perturb(ev, kind, rng)}, "frames": clip(n, n)})
    batch = batches.collate(pairs, m.tokenizer, m.qformer_tokenizer, CFG)
    with torch.no_grad():
        out = m(batch)
    chosen, rejected = fpo.policy_logprobs(out, batch, CFG.alpha)
    for branch, packed in ((1, chosen), (2, rejected)):
        singles = []
        for p in pairs:
            ev = p["evidence"]
            if branch == 2:
                r = ev["rejected"]
                ev = {**ev, "response": r["response"], "spans": r["spans"], "frames": data.to_frames(r["spans"])}
            ev = {k: v for k, v in ev.items() if k != "rejected"}
            singles.append({"evidence": ev, "frames": p["frames"]})
        b = batches.collate(singles, m.tokenizer, m.qformer_tokenizer, CFG)  # plain batches, no packing
        with torch.no_grad():
            o = m(b)
        text = fpo.token_logprobs(o["logits"], b["labels"]).sum(1)
        y = evidence.soft_targets(b["answer_spans"].clamp(min=0), o["sim"].shape[-1], CFG.alpha)
        mask = o["evi_mask"][..., None] & o["frame_mask"][:, None, :]
        grounding = fpo.grounding_logprob(o["sim"], y, mask)
        torch.testing.assert_close(packed[:, 0], text, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(packed[:, 1], grounding, rtol=1e-5, atol=1e-4)
    assert (chosen[:, 0] != rejected[:, 0]).all()


def _release_grounding(sim, intervals, n_frames, alpha):
    """The release's grounding log-prob of one response (d2vlm_fpo_arch.py, calculate_logps), written
    again in numpy: for every <evi> k with its interval (start, end) as written and every frame idx,
    distance 0 when start <= idx <= end, else min(|idx - start|, |idx - end|); target alpha ** -distance."""
    total = 0.0
    for k, (start, end) in enumerate(intervals):
        for idx in range(n_frames):
            d = 0.0 if start <= idx <= end else min(abs(idx - start), abs(idx - end))
            y, p = alpha ** -d, 1 / (1 + math.exp(-sim[k, idx]))
            total += math.log(y * p + (1 - y) * (1 - p) + 1e-10)
    return total


@pytest.mark.parametrize("chosen, rejected", [([[2.0, 5.0], [7.0, 9.0]], [[5.0, 7.0], [9.0, 11.0]]),  # whole seconds
                                              ([[2.4, 5.6], [7.2, 9.9]], [[4.6, 7.0], [9.3, 11.8]]),  # fractional
                                              ([[2.5, 5.5], [7.5, 9.5]], [[4.5, 7.0], [8.5, 10.5]])])  # half seconds
def test_the_grounding_factor_reads_the_times_as_written(chosen, rejected):
    """FPO's grounding factor of both branches equals the release's formula on the times as written
    (not rounded to frames first), for two events per answer; SFT's targets keep the rounded frames."""
    torch.manual_seed(0)
    m = model.build_model(CFG).eval()
    response = f"{EVI}{EVI}{EVI_END}{EVI} seconds, a red square grows.\n{EVI} seconds, a blue circle blinks."
    ev = {"task": "dvc", "duration": 14.0, "prompt": "Describe the events.", "question_spans": [], "question_frames": [],
          "spans": chosen, "frames": data.to_frames(chosen), "response": response,
          "rejected": {"response": response, "spans": rejected, "evi_spans": rejected * 2}}
    batch = batches.collate([{"evidence": ev, "frames": clip(14, 0)}], m.tokenizer, m.qformer_tokenizer, CFG)
    with torch.no_grad():
        out = m(batch)
    sim = out["sim"][0].double().numpy()
    branch = out["evi_branch"][0].numpy()
    for b, spans in ((1, chosen * 2), (2, rejected * 2)):
        got = fpo.response_logprob(out, batch, b, CFG.alpha)[0, 1].item()
        assert got == pytest.approx(_release_grounding(sim[branch == b], spans, 14, CFG.alpha), rel=1e-5)
        rounded = _release_grounding(sim[branch == b], data.to_frames(spans), 14, CFG.alpha)
        assert (got == pytest.approx(rounded, rel=1e-5)) == all(x == int(x) for s in spans for x in s)
    assert batch["answer_spans"][0, :4].tolist() == data.to_frames(chosen * 2)  # SFT: frames, rounded as released


def test_fpo_loss_is_log2_at_equal_inputs_and_its_gradient_widens_the_margin():
    g = torch.Generator().manual_seed(0)
    c = torch.randn(4, 2, generator=g) * torch.tensor([10.0, 5.0])  # [text, grounding] log-probs of 4 pairs
    losses, rc, rr = fpo.fpo_loss(c, c, beta=0.1)
    assert losses.shape == (4,) and rc.shape == rr.shape == (4, 2)
    assert losses.tolist() == pytest.approx([math.log(2)] * 4) and torch.equal(rc, rr)
    losses, rc, rr = fpo.fpo_loss(c, c.clone() + 1, c, c + 1, beta=0.1)  # reference = policy: rewards 0
    assert losses.tolist() == pytest.approx([math.log(2)] * 4) and not rc.any() and not rr.any()
    chosen = torch.randn(4, 2, generator=g, requires_grad=True)
    rejected = torch.randn(4, 2, generator=g, requires_grad=True)
    ref_c, ref_r = torch.randn(4, 2, generator=g), torch.randn(4, 2, generator=g)
    losses, rc, rr = fpo.fpo_loss(chosen, rejected, ref_c, ref_r, beta=0.1)
    for i in range(4):  # by hand: -log sigmoid(beta * [(pi_c - ref_c) - (pi_r - ref_r)]), factors summed
        c, r = chosen[i].detach(), rejected[i].detach()
        margin = 0.1 * (float(c.sum() - ref_c[i].sum()) - float(r.sum() - ref_r[i].sum()))
        assert losses[i].item() == pytest.approx(math.log1p(math.exp(-margin)), rel=1e-5)
    torch.testing.assert_close(rc, 0.1 * (chosen - ref_c))
    before = fpo.figures(chosen, rejected, rc, rr)
    losses.mean().backward()
    with torch.no_grad():
        assert (chosen.grad < 0).all() and (rejected.grad > 0).all()
        chosen -= 1.0 * chosen.grad  # one gradient-descent step
        rejected -= 1.0 * rejected.grad
    _, rc, rr = fpo.fpo_loss(chosen, rejected, ref_c, ref_r, beta=0.1)
    after = fpo.figures(chosen, rejected, rc, rr)
    assert after["rewards/margins"] > before["rewards/margins"]
    assert set(fpo.METRICS) == {"fpo", *after}
    parts = after["rewards/margins_text"] + after["rewards/margins_grounding"]
    assert parts.item() == pytest.approx(after["rewards/margins"].item(), rel=1e-5)
    assert after["logps/chosen_text"].item() == pytest.approx(chosen[:, 0].mean().item())
    assert after["rewards/accuracies"].item() == pytest.approx(float((rc.sum(1) > rr.sum(1)).float().mean()))
