"""Tests of eddpm/masks.py against references written here from the definitions.

References: float64 Python loops for the cumulative products, torch.distributions + autograd for the
policy gradient, exact enumeration of all masks for expectations, an active-set brute force and
scipy's SLSQP for the projection, plain `sorted()` for the final step set. Every random draw is seeded.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import optimize, stats

from eddpm import masks as M

# derandomize: the examples are a fixed function of the test, like every other seed here
SETTINGS = settings(
    max_examples=80, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
F64 = torch.float64


def sd15_betas() -> torch.Tensor:
    """SD1.5's "scaled_linear" schedule: betas = linspace(sqrt(0.00085), sqrt(0.012), 1000)^2."""
    return torch.linspace(math.sqrt(0.00085), math.sqrt(0.012), 1000, dtype=F64) ** 2


def all_masks(T: int) -> torch.Tensor:
    """Every 0/1 mask of length T, [2^T, T] float64, the empty mask first."""
    return torch.tensor(list(itertools.product([0.0, 1.0], repeat=T)), dtype=F64)


def bernoulli_prob(masks: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """p(m | s) = prod_t s_t^m_t (1 - s_t)^(1 - m_t) for masks [N, T]; differentiable in s."""
    return torch.where(masks > 0, scores, 1.0 - scores).prod(-1)


def chi2_pvalue(counts: np.ndarray, probs: np.ndarray) -> float:
    """Pearson chi-square p-value of observed counts against cell probabilities."""
    expected = probs / probs.sum() * counts.sum()
    return float(stats.chisquare(counts, expected).pvalue)


# --------------------------------------------------------------------------------------- keep_rate


def keep_rate_reference(progress: float, final: float, warmup: float, ramp_end: float) -> float:
    """Zhu & Gupta (2017) in their own terms: sparsity s_t = s_f + (s_i - s_f)(1 - (t - t0)/(n dt))^3
    from s_i = 0 (all kept) to s_f = 1 - final; the kept fraction is 1 - sparsity."""
    s_i, s_f = 0.0, 1.0 - final
    if progress < warmup:
        sparsity = s_i
    elif progress >= ramp_end:
        sparsity = s_f
    else:
        sparsity = s_f + (s_i - s_f) * (1.0 - (progress - warmup) / (ramp_end - warmup)) ** 3
    return 1.0 - sparsity


def test_keep_rate_endpoints_and_continuity():
    final, warmup, ramp_end = 0.2, 0.16, 0.6
    assert M.keep_rate(0.0, final, warmup, ramp_end) == 1.0
    assert M.keep_rate(warmup - 1e-12, final, warmup, ramp_end) == 1.0
    assert M.keep_rate(warmup, final, warmup, ramp_end) == 1.0
    assert M.keep_rate(ramp_end, final, warmup, ramp_end) == final
    assert M.keep_rate(1.0, final, warmup, ramp_end) == final
    just_after = M.keep_rate(warmup + 1e-9, final, warmup, ramp_end)
    just_before_end = M.keep_rate(ramp_end - 1e-9, final, warmup, ramp_end)
    assert abs(just_after - 1.0) < 1e-6, f"jump after warmup: {just_after}"
    assert abs(just_before_end - final) < 1e-6, f"jump at ramp_end: {just_before_end} vs {final}"
    # default ramp_end = 1: the paper's schedule, final rate only at the very end
    assert M.keep_rate(1.0, 0.05, 0.1) == 0.05
    assert M.keep_rate(0.99, 0.05, 0.1) > 0.05


def test_keep_rate_matches_paper_epoch_form():
    # Eq. (10) in epochs: gamma_e = gamma_f + (1 - gamma_f)(1 - (e - e1)/(N - e1))^3 for e >= e1
    N, e1, gamma_f = 160, 26, 0.1
    for e in range(N + 1):
        expected = 1.0 if e < e1 else gamma_f + (1 - gamma_f) * (1 - (e - e1) / (N - e1)) ** 3
        got = M.keep_rate(e / N, gamma_f, e1 / N)
        assert got == pytest.approx(expected, rel=1e-12, abs=1e-12), f"epoch {e}: {got} vs {expected}"


ramp_args = st.tuples(
    st.floats(0.0, 1.0), st.floats(0.0, 1.0), st.floats(1e-6, 1.0), st.floats(0.0, 1.0)
).filter(lambda a: a[0] < a[1])  # (warmup, ramp_end, final_rate, progress)


@SETTINGS
@given(ramp_args, st.floats(0.0, 1.0))
def test_keep_rate_formula_range_and_monotone(args, other_progress):
    warmup, ramp_end, final, progress = args
    got = M.keep_rate(progress, final, warmup, ramp_end)
    expected = keep_rate_reference(progress, final, warmup, ramp_end)
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-12), (args, got, expected)
    assert final - 1e-12 <= got <= 1.0 + 1e-12, (args, got)
    lo, hi = sorted((progress, other_progress))
    at_lo, at_hi = M.keep_rate(lo, final, warmup, ramp_end), M.keep_rate(hi, final, warmup, ramp_end)
    assert at_hi <= at_lo + 1e-15, f"not non-increasing: gamma({lo})={at_lo} < gamma({hi})={at_hi}, {args}"


@pytest.mark.parametrize(
    "progress, final_rate, warmup, ramp_end, match",
    [
        (0.5, 0.0, 0.1, 1.0, "final_rate"),
        (0.5, -0.2, 0.1, 1.0, "final_rate"),
        (0.5, 1.5, 0.1, 1.0, "final_rate"),
        (0.5, float("nan"), 0.1, 1.0, "final_rate"),
        (0.5, 0.2, -0.1, 1.0, "warmup"),
        (0.5, 0.2, 0.6, 0.6, "warmup"),
        (0.5, 0.2, 0.7, 0.6, "warmup"),
        (0.5, 0.2, 0.1, 1.5, "ramp_end"),
        (0.5, 0.2, float("nan"), 1.0, "warmup"),
        (-0.1, 0.2, 0.1, 1.0, "progress"),
        (1.1, 0.2, 0.1, 1.0, "progress"),
        (float("nan"), 0.2, 0.1, 1.0, "progress"),
        (float("inf"), 0.2, 0.1, 1.0, "progress"),
    ],
)
def test_keep_rate_rejects_bad_arguments(progress, final_rate, warmup, ramp_end, match):
    with pytest.raises(ValueError, match=match):
        M.keep_rate(progress, final_rate, warmup, ramp_end)


# ------------------------------------------------------------------------------------- sample_masks


def test_sample_masks_shape_values_and_deterministic_columns():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(50, generator=g, dtype=F64)
    scores[[3, 17]] = 0.0
    scores[[5, 42]] = 1.0
    masks = M.sample_masks(scores, 64, generator=g)
    assert masks.shape == (64, 50) and masks.dtype == F64, (masks.shape, masks.dtype)
    values = set(masks.unique().tolist())
    assert values <= {0.0, 1.0}, values
    assert masks[:, [3, 17]].sum() == 0, "a step with s = 0 was kept"
    assert bool((masks[:, [5, 42]] == 1).all()), "a step with s = 1 was masked"
    assert torch.equal(M.sample_masks(torch.ones(7, dtype=F64), 3), torch.ones(3, 7, dtype=F64))
    assert torch.equal(M.sample_masks(torch.zeros(7, dtype=F64), 3), torch.zeros(3, 7, dtype=F64))


def test_sample_masks_mean_matches_scores():
    g = torch.Generator().manual_seed(1)
    scores = torch.tensor([0.01, 0.1, 0.25, 0.5, 0.7, 0.9, 0.99, 0.33], dtype=F64)
    n = 40_000
    freq = M.sample_masks(scores, n, generator=g).mean(0)
    tol = 5 * torch.sqrt(scores * (1 - scores) / n)  # 5 binomial standard errors
    assert bool(((freq - scores).abs() <= tol).all()), f"freq {freq.tolist()} vs s {scores.tolist()}"


def test_sample_masks_rows_and_steps_independent():
    g = torch.Generator().manual_seed(2)
    n, T = 20_000, 6
    masks = M.sample_masks(torch.full((T,), 0.5, dtype=F64), n, generator=g)
    assert len({tuple(r) for r in M.sample_masks(torch.full((64,), 0.5), 200, generator=g).tolist()}) == 200
    # correlation between consecutive rows and between steps: |r| <= 5 / sqrt(n) under independence
    centred = masks - 0.5
    row_corr = (centred[1:] * centred[:-1]).mean(0) / 0.25  # [T]
    step_corr = (centred.T @ centred / n / 0.25)[~torch.eye(T, dtype=torch.bool)]
    bound = 5 / math.sqrt(n)
    assert float(row_corr.abs().max()) < bound, f"rows correlated: {row_corr.tolist()}"
    assert float(step_corr.abs().max()) < bound, f"steps correlated: {step_corr.tolist()}"


def test_sample_masks_seeded_generator_reproducible():
    scores = torch.linspace(0.05, 0.95, 40, dtype=F64)
    a = M.sample_masks(scores, 16, generator=torch.Generator().manual_seed(123), nonempty=True)
    b = M.sample_masks(scores, 16, generator=torch.Generator().manual_seed(123), nonempty=True)
    c = M.sample_masks(scores, 16, generator=torch.Generator().manual_seed(124), nonempty=True)
    assert torch.equal(a, b)
    assert not torch.equal(a, c), "different seeds gave the same 16 x 40 masks"


def test_sample_masks_nonempty_never_empty():
    g = torch.Generator().manual_seed(3)
    scores = torch.full((10,), 0.05, dtype=F64)  # P(empty row) = 0.95^10 ~ 0.60
    masks = M.sample_masks(scores, 5000, generator=g, nonempty=True)
    assert int((masks.sum(-1) == 0).sum()) == 0


def test_sample_masks_nonempty_is_conditional_bernoulli():
    # all 2^3 masks enumerated: counts must follow p(m | s) / P(m != 0), and the empty mask never occurs
    g = torch.Generator().manual_seed(4)
    scores = torch.tensor([0.1, 0.3, 0.2], dtype=F64)  # P(empty) = 0.504
    masks = M.sample_masks(scores, 30_000, generator=g, nonempty=True)
    codes = (masks @ torch.tensor([4.0, 2.0, 1.0], dtype=F64)).long()
    counts = torch.bincount(codes, minlength=8).numpy()
    probs = bernoulli_prob(all_masks(3), scores).numpy()  # same code order as the bincount
    assert counts[0] == 0, counts
    pvalue = chi2_pvalue(counts[1:], probs[1:])
    assert pvalue > 1e-3, f"counts {counts[1:].tolist()} vs probs {(probs[1:] / probs[1:].sum()).tolist()}"


@pytest.mark.parametrize(
    "scores, batch_size, nonempty",
    [
        (torch.tensor([0.5, -0.1]), 2, False),
        (torch.tensor([0.5, 1.1]), 2, False),
        (torch.tensor([0.5, 2.3, -1.7]), 2, False),  # logits, not probabilities
        (torch.tensor([0.5, float("nan")]), 2, False),
        (torch.full((2, 3), 0.5), 2, False),
        (torch.tensor([0.5, 0.5]), 0, False),
        (torch.full((5,), 1e-6), 2, True),  # a non-empty row would need ~200 000 redraws
    ],
)
def test_sample_masks_rejects_bad_input(scores, batch_size, nonempty):
    with pytest.raises(ValueError):
        M.sample_masks(scores, batch_size, nonempty=nonempty)


# ---------------------------------------------------------------------------- masked_alphas_cumprod


def masked_alphas_cumprod_reference(betas: list[float], masks_2d: list[list[float]], mode: str):
    """A float64 double loop (rows, then t) written from the definitions in docs/eddpm-algorithm.md."""
    T = len(betas)
    unmasked, acc = [], 1.0
    for t in range(T):
        acc *= 1.0 - betas[t]
        unmasked.append(acc)
    out = []
    for m in masks_2d:
        row = []
        if mode == "paper":
            acc = 1.0
            for t in range(T):
                acc *= 1.0 - betas[t] * m[t]
                row.append(acc)
        elif mode == "respaced":
            last = 1.0
            for t in range(T):
                if m[t]:
                    last = unmasked[t]
                row.append(last)
        else:  # rescaled
            total = sum(math.log(1.0 - b) for b in betas)
            kept = sum(math.log(1.0 - b) for b, k in zip(betas, m) if k)
            c = total / kept if kept < 0 else 0.0
            acc = 1.0
            for t in range(T):
                acc *= (1.0 - betas[t]) ** (c * m[t])
                row.append(acc)
        out.append(row)
    return torch.tensor(out, dtype=F64)


@pytest.mark.parametrize("mode", M.MASK_MODES)
def test_masked_alphas_cumprod_matches_loop_reference(mode):
    betas = sd15_betas()
    g = torch.Generator().manual_seed(5)
    rates = torch.tensor([[0.5, 0.2, 0.05], [0.9, 0.01, 0.3]], dtype=F64)  # [2, 3]
    masks = torch.bernoulli(rates.unsqueeze(-1).expand(2, 3, 1000), generator=g)  # [2, 3, T]
    masks[0, 0] = 0.0  # empty row
    masks[1, 1] = 1.0  # all kept
    masks[1, 2, :10] = 0.0  # leading masked steps (respaced: 1 before the first kept step)
    got = M.masked_alphas_cumprod(betas, masks.float(), mode)  # float32 masks: the function upcasts
    assert got.shape == (2, 3, 1000) and got.dtype == F64, (got.shape, got.dtype)
    expected = masked_alphas_cumprod_reference(betas.tolist(), masks.reshape(6, 1000).tolist(), mode)
    err = float((got.reshape(6, 1000) - expected).abs().max())
    assert err < 1e-12, f"mode {mode}: max |error| {err}"


def test_masked_alphas_cumprod_invariants():
    betas = sd15_betas()
    unmasked = torch.cumprod(1.0 - betas, 0)
    assert abs(float(unmasked[-1]) - 0.00466) < 5e-6, f"SD1.5 alpha-bar_999 = {float(unmasked[-1])}"
    ones, zeros = torch.ones(2, 1000), torch.zeros(2, 1000)
    g = torch.Generator().manual_seed(6)
    masks = torch.bernoulli(torch.full((8, 1000), 0.1, dtype=F64), generator=g)
    for mode in M.MASK_MODES:
        full = M.masked_alphas_cumprod(betas, ones, mode)
        assert torch.allclose(full, unmasked.expand(2, -1), rtol=1e-12, atol=0), f"{mode}: all-ones mask"
        empty = M.masked_alphas_cumprod(betas, zeros, mode)
        assert torch.equal(empty, torch.ones(2, 1000, dtype=F64)), f"{mode}: empty mask is not all ones"
    rescaled = M.masked_alphas_cumprod(betas, masks, "rescaled")
    err = float((rescaled[:, -1] - unmasked[-1]).abs().max() / unmasked[-1])
    assert err < 1e-10, f"rescaled alpha-bar_T(m) != alpha-bar_T, rel. error {err}"
    respaced = M.masked_alphas_cumprod(betas, masks, "respaced")
    kept = masks > 0
    err = float(((respaced[kept] - unmasked.expand(8, -1)[kept]) / unmasked.expand(8, -1)[kept]).abs().max())
    assert err < 1e-12, f"respaced changed a kept step's value: rel. error {err}"


def test_masked_alphas_cumprod_paper_table():
    # docs/eddpm-algorithm.md, "Masked alpha-bar": mean alpha-bar_T(m) for random masks under Eq. (6),
    # SD1.5's betas
    betas = sd15_betas()
    g = torch.Generator().manual_seed(7)
    for rate, expected in [(0.5, 0.068), (0.2, 0.34), (0.05, 0.76)]:
        masks = torch.bernoulli(torch.full((2000, 1000), rate, dtype=F64), generator=g)
        mean = float(M.masked_alphas_cumprod(betas, masks, "paper")[:, -1].mean())
        assert abs(mean - expected) < 0.05 * expected, f"{rate:.0%} kept: mean alpha-bar_T {mean} vs {expected}"


def test_masked_alphas_cumprod_rejects_bad_input():
    with pytest.raises(ValueError, match="mode"):
        M.masked_alphas_cumprod(sd15_betas(), torch.ones(1000), "ddim")
    with pytest.raises(ValueError, match="match"):
        M.masked_alphas_cumprod(sd15_betas(), torch.ones(2, 999), "paper")


# -------------------------------------------------------------------------------- sample_timesteps


def test_sample_timesteps_kept_and_uniform():
    g = torch.Generator().manual_seed(8)
    T = 30
    kept_a = [0, 3, 4, 11, 20, 29]
    kept_b = [7, 8, 9, 10, 25]
    masks = torch.zeros(2, T, dtype=F64)
    masks[0, kept_a] = 1.0
    masks[1, kept_b] = 1.0
    n = 12_000
    masks = masks.repeat(n, 1)  # rows alternate a, b
    t = M.sample_timesteps(masks, generator=g)
    assert t.dtype == torch.long and t.shape == (2 * n,), (t.dtype, t.shape)
    assert bool((masks.gather(1, t.unsqueeze(1)) == 1).all()), "a masked step was drawn"
    for row, kept in [(0, kept_a), (1, kept_b)]:
        counts = torch.bincount(t[row::2], minlength=T)[kept].numpy()
        pvalue = chi2_pvalue(counts, np.ones(len(kept)))
        assert pvalue > 1e-3, f"steps {kept} drawn {counts.tolist()} times out of {n}: not uniform"


def test_sample_timesteps_random_masks_and_seed():
    g = torch.Generator().manual_seed(9)
    masks = M.sample_masks(torch.full((1000,), 0.02, dtype=F64), 256, generator=g, nonempty=True)
    t = M.sample_timesteps(masks, generator=torch.Generator().manual_seed(10))
    assert bool((masks.gather(1, t.unsqueeze(1)) == 1).all()), "a masked step was drawn"
    assert torch.equal(t, M.sample_timesteps(masks, generator=torch.Generator().manual_seed(10)))
    single = torch.zeros(3, 1000)
    single[0, 0], single[1, 999], single[2, 500] = 1, 1, 1
    assert M.sample_timesteps(single).tolist() == [0, 999, 500]


def test_sample_timesteps_empty_row_raises_naming_it():
    masks = torch.ones(5, 8)
    masks[1] = 0.0
    masks[3] = 0.0
    with pytest.raises(ValueError, match=r"\[1, 3\]"):
        M.sample_timesteps(masks)
    with pytest.raises(ValueError):
        M.sample_timesteps(torch.ones(8))


# ---------------------------------------------------------------------------------- score_gradient


def loo_baseline_loop(losses: list[float]) -> list[float]:
    """baseline_b = mean of the other rows' losses."""
    B = len(losses)
    return [sum(losses[j] for j in range(B) if j != b) / (B - 1) for b in range(B)]


def reinforce_autograd(losses: torch.Tensor, masks: torch.Tensor, scores: torch.Tensor, baseline: str):
    """grad_s of mean_b (L_b - baseline_b) * ln Bernoulli(s).log_prob(m_b).sum(), by autograd."""
    s = scores.detach().clone().to(F64).requires_grad_(True)
    b = loo_baseline_loop(losses.tolist()) if baseline == "loo" else [0.0] * len(losses)
    advantage = losses.to(F64) - torch.tensor(b, dtype=F64)
    log_p = torch.distributions.Bernoulli(probs=s).log_prob(masks.to(F64)).sum(-1)  # [B]
    (advantage * log_p).mean().backward()
    return s.grad


@pytest.mark.parametrize("baseline", M.BASELINES)
@pytest.mark.parametrize("seed", [11, 12, 13])
def test_score_gradient_matches_autograd(baseline, seed):
    g = torch.Generator().manual_seed(seed)
    B, T = 8, 16
    scores = 0.05 + 0.9 * torch.rand(T, generator=g, dtype=F64)
    masks = torch.bernoulli(scores.expand(B, T), generator=g)
    losses = torch.rand(B, generator=g, dtype=F64)
    got = M.score_gradient(losses, masks, scores, baseline=baseline)
    expected = reinforce_autograd(losses, masks, scores, baseline)
    assert got.shape == (T,) and got.dtype == F64
    assert torch.allclose(got, expected, rtol=1e-10, atol=1e-12), f"{got.tolist()} vs {expected.tolist()}"


@pytest.mark.parametrize("baseline", M.BASELINES)
def test_score_gradient_zero_at_all_ones(baseline):
    # docs/eddpm-algorithm.md, "Consequences of the math": with s = 1 every mask is all ones and the
    # policy gradient is exactly zero
    losses = torch.tensor([0.1, 0.2, 0.7, 0.33], dtype=F64)
    got = M.score_gradient(losses, torch.ones(4, 5), torch.ones(5, dtype=F64), baseline=baseline)
    assert torch.equal(got, torch.zeros(5, dtype=F64)), f"baseline {baseline}: {got.tolist()}"


@pytest.mark.parametrize("baseline", M.BASELINES)
def test_score_gradient_zero_where_scores_are_deterministic(baseline):
    # entries at exactly 0 or 1 must stay there: m_t = s_t for every row, so their gradient is 0
    g = torch.Generator().manual_seed(14)
    scores = torch.tensor([0.0, 1.0, 0.3, 1.0, 0.0, 0.6], dtype=F64)
    masks = M.sample_masks(scores, 6, generator=g)
    losses = torch.rand(6, generator=g, dtype=F64)
    got = M.score_gradient(losses, masks, scores, baseline=baseline)
    fixed = got[[0, 1, 3, 4]]
    assert torch.equal(fixed, torch.zeros(4, dtype=F64)), f"baseline {baseline}: gradient at s in {{0,1}}: {fixed}"


def exact_expected_gradient(scores, losses_of_mask, baseline, B, nonempty=False):
    """E over B independent masks of score_gradient, by enumerating every batch of masks."""
    masks = all_masks(scores.shape[0])
    probs = bernoulli_prob(masks, scores)
    if nonempty:
        masks, probs = masks[1:], probs[1:] / probs[1:].sum()
    total = torch.zeros_like(scores)
    for rows in itertools.product(range(len(masks)), repeat=B):
        rows = list(rows)
        weight = probs[rows].prod()
        total += weight * M.score_gradient(losses_of_mask[1:][rows] if nonempty else losses_of_mask[rows],
                                           masks[rows], scores, baseline=baseline)
    return total


def true_gradient(scores, losses_of_mask, nonempty=False):
    """grad_s of E_m[L(m)] (or E_{m | m != 0}[L(m)]) by autograd through the exact sum over masks."""
    s = scores.detach().clone().requires_grad_(True)
    probs = bernoulli_prob(all_masks(s.shape[0]), s)
    if nonempty:
        objective = (probs[1:] * losses_of_mask[1:]).sum() / probs[1:].sum()
    else:
        objective = (probs * losses_of_mask).sum()
    objective.backward()
    return s.grad


@pytest.mark.parametrize("B", [2, 3])
def test_score_gradient_unbiased_by_enumeration(B):
    g = torch.Generator().manual_seed(15)
    scores = torch.tensor([0.2, 0.55, 0.8], dtype=F64)
    losses_of_mask = torch.rand(8, generator=g, dtype=F64) + 0.5  # L(m), one value per mask
    truth = true_gradient(scores, losses_of_mask)
    for baseline in M.BASELINES:
        got = exact_expected_gradient(scores, losses_of_mask, baseline, B)
        assert torch.allclose(got, truth, rtol=1e-10, atol=1e-12), f"{baseline}: {got} vs {truth}"


def test_score_gradient_loo_with_nonempty_masks():
    """What is unbiased when masks are drawn from q(m) = p(m | s) / Z, Z = P(m != 0) (nonempty=True).

    grad E_q[L] = E_q[L grad ln q] = E_q[L grad ln p] - E_q[L] grad ln Z. Leave-one-out: its
    advantages sum to zero in every batch, so mean_b A_b grad ln p(m_b) = mean_b A_b grad ln q(m_b)
    draw by draw, and that is unbiased for grad E_q[L]. Plain REINFORCE is biased by E_q[L] grad ln Z,
    and neither estimates the unconditional grad E_p[L] (whatever L(0) is taken to be).
    """
    g = torch.Generator().manual_seed(16)
    scores = torch.tensor([0.15, 0.4, 0.3], dtype=F64)
    losses_of_mask = torch.rand(8, generator=g, dtype=F64) + 0.5
    conditional = true_gradient(scores, losses_of_mask, nonempty=True)

    loo = exact_expected_gradient(scores, losses_of_mask, "loo", 2, nonempty=True)
    assert torch.allclose(loo, conditional, rtol=1e-10, atol=1e-12), f"loo {loo} vs grad E_q[L] {conditional}"

    # draw by draw: the loo estimate equals the REINFORCE estimate with the conditional score grad ln q
    masks = M.sample_masks(scores, 4, generator=g, nonempty=True)
    losses = torch.rand(4, generator=g, dtype=F64)
    s = scores.clone().requires_grad_(True)
    log_q = torch.log(bernoulli_prob(masks, s)) - torch.log(1.0 - (1.0 - s).prod())
    advantage = losses - torch.tensor(loo_baseline_loop(losses.tolist()), dtype=F64)
    (advantage * log_q).mean().backward()
    got = M.score_gradient(losses, masks, scores, baseline="loo")
    assert torch.allclose(got, s.grad, rtol=1e-10, atol=1e-12), f"{got} vs {s.grad}"

    # plain REINFORCE under q is off by exactly E_q[L] grad ln Z
    s = scores.clone().requires_grad_(True)
    torch.log(1.0 - (1.0 - s).prod()).backward()
    q = bernoulli_prob(all_masks(3), scores)[1:]
    mean_loss = float((q * losses_of_mask[1:]).sum() / q.sum())
    none = exact_expected_gradient(scores, losses_of_mask, "none", 2, nonempty=True)
    assert torch.allclose(none, conditional + mean_loss * s.grad, rtol=1e-10, atol=1e-12)
    assert float((none - conditional).abs().max()) > 0.1, "expected a visible bias of plain REINFORCE"

    # and the loo estimate is not the gradient of the unconditional objective E_p[L]
    for empty_loss in (0.0, mean_loss, 2.0):
        unconditional = true_gradient(scores, torch.cat([torch.tensor([empty_loss], dtype=F64),
                                                         losses_of_mask[1:]]))
        gap = float((loo - unconditional).abs().max())
        assert gap > 1e-3, f"L(0)={empty_loss}: loo matches grad E_p[L] ({gap})"


def test_score_gradient_rejects_bad_input():
    scores = torch.full((4,), 0.5, dtype=F64)
    with pytest.raises(ValueError, match="2 rows"):
        M.score_gradient(torch.ones(1), torch.ones(1, 4), scores, baseline="loo")
    M.score_gradient(torch.ones(1), torch.ones(1, 4), scores, baseline="none")  # B = 1 is fine without loo
    with pytest.raises(ValueError, match="baseline"):
        M.score_gradient(torch.ones(2), torch.ones(2, 4), scores, baseline="mean")
    with pytest.raises(ValueError):
        M.score_gradient(torch.ones(3), torch.ones(2, 4), scores)
    with pytest.raises(ValueError):
        M.score_gradient(torch.ones(2), torch.ones(2, 5), scores)


# ------------------------------------------------------------------------------------ projections

PROJECTIONS = [M.project_capped_simplex, M.project_capped_simplex_bisection]


@st.composite
def z_and_budget(draw, max_T: int = 200):
    """z with values inside and outside [0, 1], many duplicates, and a budget in [0, T + 2]."""
    T = draw(st.integers(1, max_T))
    pool = draw(st.lists(st.floats(-3.0, 4.0), min_size=1, max_size=5)) + [0.0, 0.5, 1.0]
    element = st.one_of(st.floats(-3.0, 4.0), st.floats(-60.0, 60.0), st.sampled_from(pool))
    z = draw(st.lists(element, min_size=T, max_size=T))
    budget = draw(st.one_of(st.floats(0.0, T + 2.0), st.integers(0, T + 2).map(float)))
    return torch.tensor(z, dtype=F64), budget


def is_active(z: torch.Tensor, budget: float) -> bool:
    return float(z.clamp(0, 1).sum()) > budget


@SETTINGS
@given(z_and_budget())
def test_projection_feasible_and_tight(args):
    z, budget = args
    T = z.shape[0]
    for project in PROJECTIONS:
        s = project(z, budget)
        assert s.shape == z.shape and s.dtype == z.dtype
        assert float(s.min()) >= 0.0 and float(s.max()) <= 1.0, (project.__name__, s.min(), s.max())
        total = float(s.sum())
        assert total <= budget + 1e-9 * T, f"{project.__name__}: sum {total} > budget {budget}"
        if is_active(z, budget):
            assert abs(total - budget) <= 1e-8 * T, f"{project.__name__}: sum {total} != budget {budget}"


@SETTINGS
@given(z_and_budget())
def test_projection_exact_and_bisection_agree_and_idempotent(args):
    z, budget = args
    exact = M.project_capped_simplex(z, budget)
    bisection = M.project_capped_simplex_bisection(z, budget)
    err = float((exact - bisection).abs().max())
    assert err <= 1e-6, f"exact vs bisection: max |diff| {err}, budget {budget}"
    for project, s in [(M.project_capped_simplex, exact), (M.project_capped_simplex_bisection, bisection)]:
        again = project(s, budget)
        drift = float((again - s).abs().max())
        assert drift <= 1e-9, f"{project.__name__} not idempotent: moved by {drift}"


@SETTINGS
@given(st.integers(1, 200).flatmap(lambda T: st.tuples(
    st.lists(st.floats(0.0, 1.0), min_size=T, max_size=T), st.floats(0.0, T + 2.0))))
def test_projection_identity_on_feasible_input(args):
    values, slack = args
    z = torch.tensor(values, dtype=F64)
    budget = float(z.sum()) + slack  # feasible: z in [0, 1]^T and sum(z) <= budget
    for project in PROJECTIONS:
        s = project(z, budget)
        if slack > 1e-9:  # clear of the summation-order rounding of sum(z): returned unchanged
            assert torch.equal(s, z), f"{project.__name__} moved a feasible point, slack {slack}"
        err = float((s - z).abs().max())
        assert err <= 1e-12, f"{project.__name__}: feasible point moved by {err} (slack {slack})"


@SETTINGS
@given(z_and_budget())
def test_projection_kkt(args):
    """There is v >= 0 with s = clip(z - v, 0, 1), and v > 0 only if sum(s) = budget."""
    z, budget = args
    s = M.project_capped_simplex(z, budget)
    tol = 1e-9
    inner = (s > tol) & (s < 1 - tol)
    # the set of v consistent with every entry: z - v = s inside, z - v >= 1 at 1, z - v <= 0 at 0
    lo = max([0.0] + (z[s <= tol] - tol).tolist())
    hi = min([math.inf] + (z[s >= 1 - tol] - 1 + tol).tolist())
    if bool(inner.any()):
        v_inner = z[inner] - s[inner]
        spread = float(v_inner.max() - v_inner.min())
        assert spread <= 1e-8, f"free entries shifted by different amounts (spread {spread})"
        lo, hi = max(lo, float(v_inner.max()) - 1e-8), min(hi, float(v_inner.min()) + 1e-8)
    assert lo <= hi, f"no shift v >= 0 gives s = clip(z - v, 0, 1): [{lo}, {hi}]"
    if float(s.sum()) < budget - 1e-8:  # slack constraint: complementary slackness forces v = 0
        assert lo <= 1e-8, f"sum(s) = {float(s.sum())} < budget {budget} but v >= {lo} > 0"


def brute_force_projection(z: np.ndarray, budget: float) -> np.ndarray:
    """The Euclidean projection by enumerating active sets: each entry at 0, at 1 or free (z_t - v),
    with v = 0 or fixed by sum = budget. Every candidate kept is feasible and the optimum is one of
    them, so the nearest candidate is the projection."""
    T = len(z)
    best, best_dist = None, math.inf
    for status in itertools.product((0, 1, 2), repeat=T):
        status = np.array(status)
        free = status == 2
        n_ones = float((status == 1).sum())
        shifts = [0.0]
        if free.any():
            shifts.append((z[free].sum() - (budget - n_ones)) / free.sum())
        for v in shifts:
            s = np.where(free, z - v, status.astype(float))
            if s.min() < -1e-12 or s.max() > 1 + 1e-12 or s.sum() > budget + 1e-12:
                continue
            dist = float(((z - s) ** 2).sum())
            if dist < best_dist:
                best, best_dist = s, dist
    return best


@settings(max_examples=60, deadline=None, derandomize=True)
@given(z_and_budget(max_T=6))
def test_projection_is_nearest_point_brute_force(args):
    z, budget = args
    expected = brute_force_projection(z.numpy(), budget)
    for project in PROJECTIONS:
        got = project(z, budget).numpy()
        err = float(np.abs(got - expected).max())
        assert err <= 1e-6, f"{project.__name__}: {got} vs brute force {expected} (z={z.tolist()}, K={budget})"


@pytest.mark.parametrize("seed", range(5))
def test_projection_matches_scipy_qp(seed):
    rng = np.random.default_rng(seed)
    T = int(rng.integers(5, 40))
    z = rng.normal(0.5, 0.8, T)
    budget = float(rng.uniform(0.2, 0.6) * np.clip(z, 0, 1).sum())
    result = optimize.minimize(
        lambda s: 0.5 * ((s - z) ** 2).sum(), np.full(T, budget / T), jac=lambda s: s - z, method="SLSQP",
        bounds=[(0.0, 1.0)] * T, constraints=[{"type": "ineq", "fun": lambda s: budget - s.sum(),
                                               "jac": lambda s: -np.ones_like(s)}],
        options={"ftol": 1e-14, "maxiter": 500},
    )
    assert result.success, result.message
    got = M.project_capped_simplex(torch.from_numpy(z), budget).numpy()
    assert np.abs(got - result.x).max() <= 1e-6, f"max |diff| {np.abs(got - result.x).max()}"
    assert ((got - z) ** 2).sum() <= ((result.x - z) ** 2).sum() + 1e-12


@pytest.mark.parametrize("project", PROJECTIONS)
def test_projection_rejects_bad_input(project):
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError, match="non-finite"):
            project(torch.tensor([0.2, bad, 0.5]), 1.0)
    for budget in (-0.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="budget"):
            project(torch.tensor([0.2, 0.5]), budget)
    with pytest.raises(ValueError):
        project(torch.full((2, 3), 0.5), 1.0)


def test_projection_keeps_float32():
    z = torch.linspace(-0.5, 1.5, 100)
    for project in PROJECTIONS:
        s = project(z, 10.0)
        assert s.dtype == torch.float32 and abs(float(s.double().sum()) - 10.0) < 1e-4, project.__name__


# ----------------------------------------------------------------------- kept_timesteps and masks


def kept_timesteps_reference(scores: list[float], num_steps: int) -> list[int]:
    """T-1 first, then the rest by (score, t) descending; the result sorted by t descending."""
    T = len(scores)
    ranked = sorted(((scores[t], t) for t in range(T - 1)), reverse=True)
    return sorted([T - 1] + [t for _, t in ranked[: num_steps - 1]], reverse=True)


@SETTINGS
@given(st.integers(1, 60).flatmap(lambda T: st.tuples(
    st.lists(st.one_of(st.sampled_from([0.0, 0.25, 0.5, 1.0]), st.floats(0.0, 1.0)), min_size=T, max_size=T),
    st.integers(1, T))))
def test_kept_timesteps_matches_sorted_reference(args):
    values, num_steps = args
    got = M.kept_timesteps(torch.tensor(values, dtype=F64), num_steps)
    expected = kept_timesteps_reference(values, num_steps)
    assert got.dtype == torch.long
    assert got.tolist() == expected, f"scores {values}, k={num_steps}: {got.tolist()} vs {expected}"


def test_kept_timesteps_ties_and_last_step():
    scores = torch.tensor([0.9, 0.5, 0.5, 0.5, 0.9, 0.0])
    assert M.kept_timesteps(scores, 1).tolist() == [5]  # T-1 kept even at score 0
    assert M.kept_timesteps(scores, 3).tolist() == [5, 4, 0]
    assert M.kept_timesteps(scores, 4).tolist() == [5, 4, 3, 0]  # tie among 1, 2, 3: larger t wins
    assert M.kept_timesteps(scores, 6).tolist() == [5, 4, 3, 2, 1, 0]
    assert M.kept_timesteps(torch.zeros(10), 3).tolist() == [9, 8, 7]


@pytest.mark.parametrize("num_steps", [0, -1, 7])
def test_kept_timesteps_rejects_bad_num_steps(num_steps):
    with pytest.raises(ValueError, match="num_steps"):
        M.kept_timesteps(torch.rand(6), num_steps)


def test_mask_from_timesteps_round_trip():
    g = torch.Generator().manual_seed(17)
    scores = torch.rand(1000, generator=g, dtype=F64)
    steps = M.kept_timesteps(scores, 20)
    mask = M.mask_from_timesteps(steps, 1000)
    assert mask.shape == (1000,) and mask.dtype == F64
    assert mask.sum() == 20 and mask.nonzero().flatten().flip(0).tolist() == steps.tolist()
    t = M.sample_timesteps(mask.expand(500, -1), generator=g)
    assert set(t.tolist()) <= set(steps.tolist())
    assert torch.equal(M.mask_from_timesteps(torch.tensor([0, 999, 0]), 1000).nonzero().flatten(),
                       torch.tensor([0, 999]))


# --- the mask policy (eddpm/training.py) with the gap reward ------------------------------------------------


def test_mask_policy_gap_reward_pins_the_start_step_and_respects_the_budget():
    from eddpm.rewards import gap_rewards
    from eddpm.training import MaskPolicy

    betas = sd15_betas()
    gen = torch.Generator().manual_seed(3)
    policy = MaskPolicy(betas, mask_mode="respaced", lr=0.05, optimizer="adam", reward="gap")
    for step in range(6):
        draw = policy.draw(8, gen)
        losses = torch.rand(8, generator=gen, dtype=torch.float64)
        policy.update(losses, draw["masks"], keep_fraction=0.3, timesteps=draw["timesteps"])
        assert policy.scores[-1] == 1.0, f"step {step}: s_(T-1) = {float(policy.scores[-1])}"
        assert float(policy.scores.sum()) <= 0.3 * 1000 + 1e-9
    with pytest.raises(ValueError, match="timesteps"):
        policy.update(losses, draw["masks"], keep_fraction=0.3)
    # the reward handed to the score gradient is gap_rewards of the losses, not the losses
    plain = MaskPolicy(betas, mask_mode="respaced", lr=0.05, optimizer="sgd", reward="loss")
    gap = MaskPolicy(betas, mask_mode="respaced", lr=0.05, optimizer="sgd", reward="gap")
    with torch.no_grad():  # inside (0, 1), where the score gradient is not zero
        plain.scores.fill_(0.5)
        gap.scores.fill_(0.5)
    draw = plain.draw(8, gen)
    losses = torch.rand(8, generator=gen, dtype=torch.float64)
    expected = M.score_gradient(gap_rewards(losses, draw["masks"], draw["timesteps"], betas, "respaced"),
                              draw["masks"], gap.scores)
    gap.update(losses, draw["masks"], keep_fraction=1.0, timesteps=draw["timesteps"])
    plain.update(losses, draw["masks"], keep_fraction=1.0)
    assert not torch.allclose(gap.scores, plain.scores), "the gap reward changed nothing"
    # with keep_fraction 1 the projection is the box clip; sgd without momentum: s' = clip(1 - lr * g)
    clip = min(1.0, 3.0 / float(expected.norm())) if float(expected.norm()) > 0 else 1.0
    want = (torch.full((1000,), 0.5, dtype=torch.float64) - 0.05 * clip * expected).clamp(0, 1)
    want[-1] = 1.0
    torch.testing.assert_close(gap.scores, want, rtol=0, atol=1e-12)


# --- C_t: loss weightings (eddpm/training.py loss_weights) ------------------------------------------------


def _x0_and_eps_errors(alpha_bar: torch.Tensor, seed: int = 0):
    """Per-row squared errors of a made-up eps prediction, in eps space and in x0 space ([B] each): the
    x0 error is computed from x_t the way a sampler reads it, independently of any SNR formula."""
    g = torch.Generator().manual_seed(seed)
    B = alpha_bar.numel()
    x0, eps = torch.randn(B, 4, 3, 3, generator=g, dtype=torch.float64), torch.randn(B, 4, 3, 3, generator=g, dtype=torch.float64)
    eps_hat = eps + 0.3 * torch.randn(B, 4, 3, 3, generator=g, dtype=torch.float64)
    a = alpha_bar.double()[:, None, None, None]
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    x0_hat = (x_t - (1 - a).sqrt() * eps_hat) / a.sqrt()
    return (x0 - x0_hat).square().mean((1, 2, 3)), (eps - eps_hat).square().mean((1, 2, 3))


def test_truncated_snr_weighting_is_the_larger_of_the_x0_and_eps_errors():
    from eddpm.training import loss_weights

    alpha_bar = torch.cumprod(1 - sd15_betas(), 0)[torch.tensor([0, 50, 200, 400, 600, 800, 950, 999])]
    x0_err, eps_err = _x0_and_eps_errors(alpha_bar)
    weighted = loss_weights(alpha_bar, "truncated_snr").double() * eps_err
    torch.testing.assert_close(weighted, torch.maximum(x0_err, eps_err), rtol=1e-5, atol=0)
    w = loss_weights(alpha_bar, "truncated_snr")
    assert w.dtype == torch.float32 and w[0] == 1.0 and float(w[-1]) == pytest.approx(213.6, abs=0.1)  # (1 - 0.00466) / 0.00466


def test_min_snr_and_none_weightings():
    from eddpm.training import loss_weights

    alpha_bar = torch.tensor([0.999, 0.9, 5 / 6, 0.5, 0.0047], dtype=torch.float64)
    snr = alpha_bar / (1 - alpha_bar)
    torch.testing.assert_close(loss_weights(alpha_bar, "min_snr", 5.0), (torch.clamp(snr, max=5.0) / snr).float())
    assert loss_weights(alpha_bar, "min_snr", 5.0)[2:].tolist() == [1.0, 1.0, 1.0]  # SNR <= 5: weight 1
    assert loss_weights(alpha_bar, "none").tolist() == [1.0] * 5
    with pytest.raises(ValueError, match="unknown loss weighting 'x0'"):
        loss_weights(alpha_bar, "x0")


class _FixedUNet(torch.nn.Module):
    """Stands for the UNet: returns a fixed prediction, so the loss's target is all that is tested."""

    def __init__(self, prediction: torch.Tensor):
        super().__init__()
        self.prediction = prediction

    def forward(self, sample, timestep, encoder_hidden_states):
        from types import SimpleNamespace

        assert sample.shape[1] == 8  # [x_t, clean condition]
        return SimpleNamespace(sample=self.prediction)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_diffusion_loss_target_and_its_eps_error(prediction_type):
    """v = sqrt(a) eps - sqrt(1-a) x0 (diffusers' DDPMScheduler.get_velocity is the reference), and eps_error
    equals the error of the eps a sampler would read off the prediction and x_t."""
    from diffusers import DDPMScheduler

    from eddpm.training import diffusion_loss, eps_error

    g = torch.Generator().manual_seed(3)
    B = 4
    x0, eps, pred = (torch.randn(B, 4, 5, 5, generator=g) for _ in range(3))
    cond, embeds = torch.randn(B, 4, 5, 5, generator=g), torch.randn(B, 77, 8, generator=g)
    t = torch.tensor([0, 300, 700, 999])
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    alpha_bar = sched.alphas_cumprod[t]
    losses = diffusion_loss(_FixedUNet(pred), x0, cond, embeds, eps, t, alpha_bar, prediction_type=prediction_type)
    target = eps if prediction_type == "epsilon" else sched.get_velocity(x0, eps, t)
    torch.testing.assert_close(losses, (pred - target).square().mean((1, 2, 3)), rtol=1e-5, atol=1e-6)
    a = alpha_bar.double()[:, None, None, None]
    x_t = a.sqrt() * x0.double() + (1 - a).sqrt() * eps.double()
    implied_eps = pred.double() if prediction_type == "epsilon" else a.sqrt() * pred.double() + (1 - a).sqrt() * x_t
    torch.testing.assert_close(eps_error(losses, alpha_bar, prediction_type).double(),
                               (implied_eps - eps.double()).square().mean((1, 2, 3)), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        diffusion_loss(_FixedUNet(pred), x0, cond, embeds, eps, t, alpha_bar, prediction_type="sample")
