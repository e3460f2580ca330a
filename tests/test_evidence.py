"""evidence.py: similarity, soft targets, interval selection and evidence pooling, against hand-computed
numbers and slow pure-python references."""
import math
import random

import pytest
import torch

from evidence import pool_evidence, select_interval, similarity, soft_targets

# ---------------------------------------------------------------------------------------------
# similarity


def test_similarity_matches_loop():
    g = torch.Generator().manual_seed(0)
    B, K, T, d = 2, 3, 5, 8
    evi, frames = torch.randn(B, K, d, generator=g), torch.randn(B, T, d, generator=g)
    out = similarity(evi, frames)
    assert out.shape == (B, K, T)
    E, F = evi.tolist(), frames.tolist()
    ref = [[[sum(x * y for x, y in zip(E[b][k], F[b][t])) / math.sqrt(d) for t in range(T)] for k in range(K)]
           for b in range(B)]
    torch.testing.assert_close(out, torch.tensor(ref))


def test_similarity_scale_by_hand():
    # d = 4: (1, 1, 1, 1) . (2, 0, 1, 1) = 4, divided by sqrt(4) = 2
    evi = torch.tensor([[[1.0, 1.0, 1.0, 1.0]]])
    frames = torch.tensor([[[2.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0], [-1.0, -1.0, -1.0, -1.0]]])
    torch.testing.assert_close(similarity(evi, frames), torch.tensor([[[2.0, 0.0, -2.0]]]))


def test_similarity_shape_mismatch_raises():
    with pytest.raises(ValueError):
        similarity(torch.zeros(1, 2, 4), torch.zeros(1, 3, 5))


def test_similarity_gradients():
    g = torch.Generator().manual_seed(1)
    B, K, T, d = 2, 2, 4, 6
    evi = torch.randn(B, K, d, generator=g, requires_grad=True)
    frames = torch.randn(B, T, d, generator=g, requires_grad=True)
    similarity(evi, frames).sum().backward()
    # d(sum)/d evi[b, k] = sum_t frames[b, t] / sqrt(d); d(sum)/d frames[b, t] = sum_k evi[b, k] / sqrt(d)
    torch.testing.assert_close(evi.grad, frames.detach().sum(1, keepdim=True).expand(B, K, d) / math.sqrt(d))
    torch.testing.assert_close(frames.grad, evi.detach().sum(1, keepdim=True).expand(B, T, d) / math.sqrt(d))
    assert evi.grad.abs().sum() > 0 and frames.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# soft targets


def targets(span, T, alpha=2.0):
    return soft_targets(torch.tensor([[span]]), T, alpha)[0, 0]


def test_soft_targets_point_span():
    expected = [1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 1, 1 / 2, 1 / 4, 1 / 8]
    torch.testing.assert_close(targets([5, 5], 9), torch.tensor(expected))


def test_soft_targets_span_at_start_and_end():
    torch.testing.assert_close(targets([0, 2], 6), torch.tensor([1, 1, 1, 0.5, 0.25, 0.125]))
    torch.testing.assert_close(targets([3, 5], 6), torch.tensor([0.125, 0.25, 0.5, 1, 1, 1]))
    torch.testing.assert_close(targets([0, 5], 6), torch.ones(6))


def test_soft_targets_alpha_3():
    torch.testing.assert_close(targets([2, 3], 7, alpha=3.0), torch.tensor([1 / 9, 1 / 3, 1, 1, 1 / 3, 1 / 9, 1 / 27]))


def test_soft_targets_batch_of_different_spans():
    spans = torch.tensor([[[0, 0], [2, 4]], [[4, 4], [1, 2]]])
    y = soft_targets(spans, 5, 2.0)
    assert y.shape == (2, 2, 5) and y.dtype == torch.float32
    expected = torch.tensor([[[1, 0.5, 0.25, 0.125, 0.0625], [0.25, 0.5, 1, 1, 1]],
                             [[0.0625, 0.125, 0.25, 0.5, 1], [0.5, 1, 1, 0.5, 0.25]]])
    torch.testing.assert_close(y, expected)


def test_soft_targets_bad_input_raises():
    with pytest.raises(ValueError):
        targets([3, 2], 5)
    with pytest.raises(ValueError):
        targets([1, 2], 5, alpha=1.0)


# ---------------------------------------------------------------------------------------------
# interval selection

def logit(p):
    return torch.logit(torch.tensor(p, dtype=torch.float64))


def pick(p, ratio=0.6, mask=None):
    """select_interval on one row of probabilities; returns [s, e] as a list."""
    m = None if mask is None else torch.tensor([mask])
    return select_interval(logit([p])[None], ratio, m)[0, 0].tolist()


def test_select_single_peak():
    assert pick([0.1, 0.1, 0.8, 0.9, 0.85, 0.1, 0.1]) == [2, 4]


def test_select_higher_mean_beats_longer_run():
    # threshold 0.6 * 0.95 = 0.57: runs [0, 1] (mean 0.925) and [3, 6] (mean 0.7)
    assert pick([0.9, 0.95, 0.1, 0.7, 0.7, 0.7, 0.7, 0.1]) == [0, 1]
    assert pick([0.7, 0.7, 0.7, 0.7, 0.1, 0.9, 0.95]) == [5, 6]


def test_select_tie_takes_earliest_run():
    assert pick([0.1, 0.8, 0.9, 0.1, 0.8, 0.9, 0.1]) == [1, 2]
    assert pick([0.9, 0.1, 0.9, 0.1, 0.9]) == [0, 0]


def test_select_single_frame():
    assert pick([0.1, 0.1, 0.1, 0.9, 0.1]) == [3, 3]
    assert pick([0.3]) == [0, 0]


def test_select_flat_scores_cover_valid_frames():
    assert pick([0.5] * 8) == [0, 7]
    assert pick([0.5] * 8, mask=[True] * 5 + [False] * 3) == [0, 4]


def test_select_ignores_padded_frames():
    # padded frames have the highest scores; unmasked they would win
    p = [0.1, 0.8, 0.7, 0.1, 0.99, 0.99]
    assert pick(p) == [4, 5]
    assert pick(p, mask=[True] * 4 + [False] * 2) == [1, 2]
    # and they must not set the max: over valid frames max = 0.5, threshold 0.3 keeps [0, 1];
    # with the padded 0.95 in the max (threshold 0.57) no valid frame would be kept
    assert pick([0.45, 0.5, 0.1, 0.95, 0.95], mask=[True, True, True, False, False]) == [0, 1]


def test_select_ratio():
    p = [0.5, 0.7, 0.9, 0.7, 0.5]
    assert pick(p, ratio=0.6) == [1, 3]  # threshold 0.54
    assert pick(p, ratio=0.5) == [0, 4]  # threshold 0.45
    assert pick(p, ratio=0.9) == [2, 2]  # threshold 0.81
    assert pick(p, ratio=0.0) == [0, 4]
    with pytest.raises(ValueError):
        pick(p, ratio=1.5)


def test_select_batched_rows_are_independent():
    # B = 2 videos of different lengths, K = 2 tokens each
    rows = [[[0.1, 0.8, 0.9, 0.1, 0.2], [0.9, 0.1, 0.1, 0.1, 0.1]],
            [[0.2, 0.2, 0.9, 0.99, 0.99], [0.5, 0.5, 0.5, 0.5, 0.5]]]
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    out = select_interval(logit(rows), 0.6, mask)
    assert out.dtype == torch.long and out.shape == (2, 2, 2)
    assert out.tolist() == [[[1, 2], [0, 0]], [[2, 2], [0, 2]]]
    # float32 logits give the same answer
    assert select_interval(logit(rows).float(), 0.6, mask).tolist() == out.tolist()


def test_select_video_without_valid_frames_raises():
    with pytest.raises(ValueError):
        select_interval(torch.zeros(1, 1, 3), 0.6, torch.zeros(1, 3, dtype=torch.bool))


def reference_select(p, valid, ratio):
    """Slow reference for one row: p and valid are python lists."""
    m = max(x for x, v in zip(p, valid) if v)
    kept = [v and x >= ratio * m for x, v in zip(p, valid)]
    runs, t = [], 0
    while t < len(p):
        if kept[t]:
            s = t
            while t + 1 < len(p) and kept[t + 1]:
                t += 1
            runs.append((s, t))
        t += 1
    best, best_mean = None, None
    for s, e in runs:
        mean = sum(p[s:e + 1]) / (e - s + 1)
        if best is None or mean > best_mean:  # strict: ties keep the earliest run
            best, best_mean = [s, e], mean
    return best


def random_mask(rng, B, T):
    rows = []
    for _ in range(B):
        if rng.random() < 0.5:  # a padded video: valid prefix
            n = rng.randint(1, T)
            rows.append([t < n for t in range(T)])
        else:  # any pattern with at least one valid frame
            row = [rng.random() < 0.7 for _ in range(T)]
            row[rng.randrange(T)] = True
            rows.append(row)
    return torch.tensor(rows)


def check_against_reference(logits, ratio, mask):
    out = select_interval(logits, ratio, mask)
    p = logits.sigmoid()
    B, K, _ = logits.shape
    for b in range(B):
        for k in range(K):
            assert out[b, k].tolist() == reference_select(p[b, k].tolist(), mask[b].tolist(), ratio)


def test_select_random_against_reference():
    rng, g = random.Random(0), torch.Generator().manual_seed(0)
    for _ in range(200):
        B, K, T = rng.randint(1, 3), rng.randint(1, 3), rng.randint(1, 12)
        logits = torch.randn(B, K, T, generator=g, dtype=torch.float64) * rng.choice([0.3, 1.0, 3.0])
        check_against_reference(logits, rng.random(), random_mask(rng, B, T))


def test_select_random_with_exact_ties_against_reference():
    # logits whose sigmoids are exact dyadic numbers, so equal run means are exactly equal in float
    levels = torch.tensor([-math.log(3), 0.0, math.log(3), math.log(7), 40.0], dtype=torch.float64)
    assert levels.sigmoid().tolist() == [0.25, 0.5, 0.75, 0.875, 1.0]
    rng, g = random.Random(1), torch.Generator().manual_seed(1)
    for _ in range(200):
        B, K, T = rng.randint(1, 3), rng.randint(1, 3), rng.randint(1, 12)
        logits = levels[torch.randint(len(levels), (B, K, T), generator=g)]
        check_against_reference(logits, rng.choice([0.0, 0.3, 0.6, 0.8, 1.0, rng.random()]), random_mask(rng, B, T))


# ---------------------------------------------------------------------------------------------
# evidence pooling


def test_pool_matches_loop_mean():
    g = torch.Generator().manual_seed(2)
    B, T, D = 2, 7, 5
    states = torch.randn(B, T, D, generator=g)
    spans = torch.tensor([[[0, 2], [3, 3], [0, 6]], [[4, 6], [1, 5], [2, 2]]])
    out = pool_evidence(states, spans)
    assert out.shape == (B, 3, D)
    S = states.tolist()
    for b in range(B):
        for k in range(3):
            s, e = spans[b, k].tolist()
            ref = [sum(S[b][t][i] for t in range(s, e + 1)) / (e - s + 1) for i in range(D)]
            torch.testing.assert_close(out[b, k], torch.tensor(ref))


def test_pool_point_span_is_that_frame():
    g = torch.Generator().manual_seed(3)
    states = torch.randn(1, 6, 4, generator=g)
    out = pool_evidence(states, torch.tensor([[[0, 0], [4, 4], [5, 5]]]))
    assert torch.equal(out[0], states[0, [0, 4, 5]])


def test_pool_frame_mask_drops_padded_frames():
    states = torch.arange(12.0).view(1, 6, 2)  # frame t holds (2t, 2t + 1)
    mask = torch.tensor([[True, True, True, True, False, False]])
    out = pool_evidence(states, torch.tensor([[[2, 5]]]), mask)
    torch.testing.assert_close(out, torch.tensor([[[5.0, 6.0]]]))  # mean of frames 2, 3
    with pytest.raises(ValueError):
        pool_evidence(states, torch.tensor([[[4, 5]]]), mask)


def test_pool_keeps_dtype():
    for dtype in (torch.float64, torch.bfloat16):
        states = torch.ones(1, 4, 3, dtype=dtype)
        out = pool_evidence(states, torch.tensor([[[1, 3]]]))
        assert out.dtype == dtype and torch.equal(out, torch.ones(1, 1, 3, dtype=dtype))


def test_pool_bad_spans_raise():
    states = torch.zeros(1, 5, 2)
    with pytest.raises(ValueError):
        pool_evidence(states, torch.tensor([[[3, 2]]]))
    with pytest.raises(ValueError):
        pool_evidence(states, torch.tensor([[[3, 5]]]))
    with pytest.raises(ValueError):
        pool_evidence(states, torch.tensor([[[-1, 2]]]))


def test_pool_gradients_only_inside_spans():
    g = torch.Generator().manual_seed(4)
    B, T, D = 2, 8, 3
    states = torch.randn(B, T, D, generator=g, requires_grad=True)
    spans = torch.tensor([[[1, 3], [2, 2]], [[5, 7], [5, 6]]])
    pool_evidence(states, spans).sum().backward()
    # each frame gets sum over the spans containing it of 1 / span length
    expected = torch.zeros(B, T)
    for b in range(B):
        for s, e in spans[b].tolist():
            expected[b, s:e + 1] += 1 / (e - s + 1)
    torch.testing.assert_close(states.grad, expected[..., None].expand(B, T, D))
    assert (states.grad[0, [0, 4, 5, 6, 7]] == 0).all() and (states.grad[1, :5] == 0).all()
    assert (states.grad[0, 1:4] != 0).all() and (states.grad[1, 5:] != 0).all()
