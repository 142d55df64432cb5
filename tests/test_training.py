"""eddpm.training.train_step on the tiny UNet: what the policy receives, accumulation, non-finite steps, rewards.

Each test builds a fresh trainee (tiny 8-channel UNet, AdamW, EMA, a single-process CPU Accelerator) and
injects what it observes through public seams: a MaskPolicy subclass that records its calls, a UNet
wrapper that returns NaN on a chosen call. Expected values are written out in the test.
"""

from __future__ import annotations

import copy
import inspect
import math

import pytest
import torch

from eddpm.config import TrainConfig
from eddpm.masks import masked_alphas_cumprod
from eddpm.policy import MaskPolicy, UniformTimesteps
from eddpm.training import StatsWindow, StepSettings, Trainee, step_seed, train_step

T = 1000


def sd15_betas() -> torch.Tensor:
    return torch.linspace(0.00085**0.5, 0.012**0.5, T, dtype=torch.float64) ** 2  # scaled_linear, written out


class RecordingPolicy(MaskPolicy):
    """MaskPolicy that keeps a copy of every draw and every update it is given."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.draws, self.updates = [], []

    def draw(self, batch_size, generator):
        result = super().draw(batch_size, generator)
        self.draws.append({k: v.clone() for k, v in result.items()})
        return result

    def update(self, losses, masks, keep_fraction, timesteps=None, step_errors=None):
        self.updates.append({"losses": losses.clone(), "masks": masks.clone(), "timesteps": timesteps.clone(),
                             "keep_fraction": keep_fraction,
                             "step_errors": None if step_errors is None else step_errors.clone()})
        return super().update(losses, masks, keep_fraction, timesteps=timesteps, step_errors=step_errors)


class NaNOnCall(torch.nn.Module):
    """The wrapped UNet, with a NaN output on the listed (1-based) forward calls."""

    def __init__(self, unet, bad_calls):
        super().__init__()
        self.unet, self.bad_calls, self.calls = unet, set(bad_calls), 0

    def forward(self, *args, **kw):
        self.calls += 1
        out = self.unet(*args, **kw)
        if self.calls in self.bad_calls:
            out.sample = out.sample * float("nan")
        return out


def make_trainee(tiny_components, policy, wrap=None, ema=True):
    from accelerate import Accelerator
    from diffusers.training_utils import EMAModel

    unet = copy.deepcopy(tiny_components.unet).train()
    model = wrap(unet) if wrap else unet
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3, foreach=True)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    ema_model = EMAModel(unet.parameters(), decay=0.9, foreach=True) if ema else None
    return Trainee(Accelerator(cpu=True), model, optimizer, lr_scheduler, policy, ema_model,
                   empty_prompt_embeds=torch.zeros(77, 32))


def micro_batch(seed: int, batch: int = 3) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"latents": torch.randn(batch, 4, 8, 8, generator=g), "cond_latents": torch.randn(batch, 4, 8, 8, generator=g),
            "prompt_embeds": torch.randn(batch, 77, 32, generator=g)}


def params(module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def test_policy_defaults_are_the_training_defaults():
    """One set of defaults: MaskPolicy() runs what `python train.py` runs."""
    signature = inspect.signature(MaskPolicy.__init__).parameters
    cfg = TrainConfig()
    expected = {"mask_mode": cfg.mask_mode, "baseline": cfg.pg_baseline, "lr": cfg.scores_lr,
                "optimizer": cfg.scores_optimizer, "max_grad_norm": cfg.scores_max_grad_norm, "reward": cfg.pg_reward}
    assert {name: signature[name].default for name in expected} == expected


def test_the_policy_gets_every_micro_batch_in_order(tiny_components):
    """Three micro-batches of 3: one update with all 9 rows, in draw order; each row's t is kept by its mask and
    its alpha-bar is the masked one of that mask; the keep fraction is passed through."""
    policy = RecordingPolicy(sd15_betas())
    with torch.no_grad():  # a policy mid-training, so masks differ from row to row
        policy.scores.copy_(torch.rand(T, generator=torch.Generator().manual_seed(1)).double().clamp(0.05, 1))
    trainee = make_trainee(tiny_components, policy)
    out = train_step(trainee, [micro_batch(i) for i in range(3)], torch.Generator().manual_seed(0), 0.5,
                     StepSettings(caption_dropout=0.0))
    assert out.finite and len(policy.draws) == 3 and len(policy.updates) == 1
    update = policy.updates[0]
    masks = torch.cat([d["masks"] for d in policy.draws]).float()  # [9, T]
    timesteps = torch.cat([d["timesteps"] for d in policy.draws])  # [9]
    assert torch.equal(update["masks"], masks) and torch.equal(update["timesteps"], timesteps)
    assert update["keep_fraction"] == 0.5 and update["losses"].shape == (9,)
    assert bool((masks.gather(1, timesteps[:, None]) == 1).all()), "a row's t is masked out"
    alpha_bar = masked_alphas_cumprod(sd15_betas(), masks, "respaced").gather(1, timesteps[:, None]).squeeze(1)
    assert torch.equal(torch.cat([d["alpha_bar_t"] for d in policy.draws]), alpha_bar)
    assert torch.equal(out.losses, update["losses"])


def test_accumulated_gradient_is_the_mean_over_micro_batches(tiny_components):
    """SGD with lr 1 and no clipping moves the weights by exactly the gradient: two micro-batches of 2 move them
    as the mean of the two micro-batches' gradients, each computed alone with the same draws and noise."""
    from eddpm.losses import diffusion_loss

    policy = RecordingPolicy(sd15_betas())
    trainee = make_trainee(tiny_components, policy, ema=False)
    unet = trainee.unet
    trainee.optimizer = torch.optim.SGD(unet.parameters(), lr=1.0)
    trainee.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(trainee.optimizer, lambda step: 1.0)
    before = params(unet)
    batches = [micro_batch(10, 2), micro_batch(11, 2)]
    generator = torch.Generator().manual_seed(3)
    train_step(trainee, batches, generator, 1.0, StepSettings(caption_dropout=0.0, max_grad_norm=1e9))

    replay = torch.Generator().manual_seed(3)  # the same draws, in train_step's order: masks, t, noise, dropout
    reference = copy.deepcopy(unet)
    with torch.no_grad():
        for p, b in zip(reference.parameters(), before):
            p.copy_(b)
    grads = [torch.zeros_like(p) for p in reference.parameters()]
    for batch in batches:
        draw = MaskPolicy.draw(policy, 2, replay)
        noise = torch.randn(batch["latents"].shape, generator=replay)
        torch.rand(2, generator=replay)
        reference.zero_grad()
        loss = diffusion_loss(reference, batch["latents"], batch["cond_latents"], batch["prompt_embeds"], noise,
                              draw["timesteps"], draw["alpha_bar_t"]).mean()
        loss.backward()
        for g, p in zip(grads, reference.parameters()):
            g += p.grad / 2
    for b, p, g in zip(before, unet.parameters(), grads):
        torch.testing.assert_close(b - p.detach(), g, rtol=1e-4, atol=1e-6)


def test_a_nonfinite_micro_batch_skips_the_whole_step(tiny_components):
    """NaN in the second of two micro-batches: weights, EMA and s stay as they were, the LR schedule advances."""
    policy = MaskPolicy(sd15_betas())
    trainee = make_trainee(tiny_components, policy, wrap=lambda u: NaNOnCall(u, {2}))
    with torch.no_grad():
        policy.scores[:500] = 0.5
    weights, shadow, scores = params(trainee.unet), [s.clone() for s in trainee.ema.shadow_params], policy.scores.clone()
    out = train_step(trainee, [micro_batch(0), micro_batch(1)], torch.Generator().manual_seed(0), 0.5, StepSettings())
    assert not out.finite and math.isnan(out.grad_norm) and math.isnan(out.score_grad_norm)
    assert all(torch.equal(a, b) for a, b in zip(weights, params(trainee.unet)))
    assert all(torch.equal(a, b) for a, b in zip(shadow, trainee.ema.shadow_params))
    assert torch.equal(scores, policy.scores)
    assert trainee.lr_scheduler.last_epoch == 1
    assert all(p.grad is None for p in trainee.unet.parameters())
    out = train_step(trainee, [micro_batch(0), micro_batch(1)], torch.Generator().manual_seed(0), 0.5, StepSettings())
    assert out.finite and not all(torch.equal(a, b) for a, b in zip(weights, params(trainee.unet)))
    assert not torch.equal(scores, policy.scores)


@pytest.mark.parametrize("reward", ["loss", "gap"])
def test_the_policy_gets_the_weighted_loss_or_the_eps_error(tiny_components, reward):
    """v-prediction with truncated_snr: reward "loss" receives L_b = max(1, 1/SNR) ||v - v'||^2, reward "gap" the eps
    error alpha-bar_t ||v - v'||^2; ||v - v'||^2 is recomputed here from the replayed draws, v written out."""
    policy = RecordingPolicy(sd15_betas(), reward=reward)
    trainee = make_trainee(tiny_components, policy)
    unet_before = copy.deepcopy(trainee.unet).eval()
    batch = micro_batch(5)
    train_step(trainee, [batch], torch.Generator().manual_seed(2), 1.0,
               StepSettings(caption_dropout=0.0, prediction_type="v_prediction", loss_weighting="truncated_snr"))
    replay = torch.Generator().manual_seed(2)
    draw = MaskPolicy.draw(policy, 3, replay)
    noise = torch.randn(batch["latents"].shape, generator=replay)
    a = draw["alpha_bar_t"].double().view(-1, 1, 1, 1)
    x0 = batch["latents"].double()
    x_t = (a.sqrt() * x0 + (1 - a).sqrt() * noise.double()).float()
    v = (a.sqrt() * noise.double() - (1 - a).sqrt() * x0).float()
    with torch.no_grad():
        pred = unet_before(torch.cat([x_t, batch["cond_latents"]], 1), draw["timesteps"],
                           encoder_hidden_states=batch["prompt_embeds"]).sample
    plain = (pred - v).double().pow(2).mean((1, 2, 3))
    a = a.flatten()
    expected = plain * (a if reward == "gap" else torch.clamp((1 - a) / a, min=1.0))
    torch.testing.assert_close(policy.updates[0]["losses"].double(), expected, rtol=1e-4, atol=1e-7)


def test_uniform_timesteps_is_ddpm_training():
    """UniformTimesteps draws t ~ U{0..T-1} (chi-square over 10 bins) with the unmasked alpha-bar, never updates."""
    betas = sd15_betas()
    policy = UniformTimesteps(betas)
    draw = policy.draw(20_000, torch.Generator().manual_seed(0))
    counts = torch.bincount(draw["timesteps"] // 100, minlength=10).double()
    chi2 = float(((counts - 2000) ** 2 / 2000).sum())
    assert chi2 < 27.9, chi2  # p = 0.001 at 9 degrees of freedom
    alpha_bar = torch.cumprod(1 - betas, 0)
    assert torch.equal(draw["alpha_bar_t"], alpha_bar[draw["timesteps"]])
    assert draw["masks"].shape == (20_000, T) and bool((draw["masks"] == 1).all())
    assert abs(float(alpha_bar[-1]) - 0.00466) < 1e-5  # SD1.5's unmasked alpha-bar at t = 999
    before = policy.scores.clone()
    policy.update(torch.ones(4), draw["masks"][:4], 0.1)
    assert torch.equal(before, policy.scores)


def test_step_seed_differs_by_rank_and_step():
    seeds = {step_seed(0, rank, step) for rank in range(4) for step in range(100)}
    assert len(seeds) == 400 and step_seed(3, 1, 7) == (3 * 1_000_003 + 7_919 + 7)


def test_stats_window_means_over_finite_steps(tiny_components):
    """The row's loss is the mean of the finite steps' mean losses; a window of non-finite steps logs NaN."""
    from eddpm.training import StepOutput

    def out(finite, losses, t):
        losses = torch.tensor(losses)
        return StepOutput(finite, losses, torch.ones(len(losses), T), torch.tensor(t), torch.tensor([0.1, 0.3]),
                          grad_norm=2.0 if finite else math.nan)

    window = StatsWindow(T)
    window.add(out(True, [1.0, 3.0], [50, 950]))
    window.add(out(False, [float("nan")] * 2, [50, 950]))
    window.add(out(True, [5.0, 7.0], [60, 960]))
    row = window.row()
    assert row["loss"] == 4.0 and row["grad_norm"] == 2.0 and row["kept_per_mask"] == T
    assert row["loss_t000-099"] == 3.0 and row["loss_t900-999"] == 5.0
    assert row["alpha_bar_T"] == pytest.approx(0.2)
    window.add(out(False, [float("nan")] * 2, [1, 2]))
    assert math.isnan(window.row()["loss"])


def test_a_one_row_step_leaves_the_loo_policy_unchanged():
    """Batch 1 (the iclight preset's micro-batch): an epoch's last optimizer step may hold a single row, which
    has no leave-one-out baseline; s stays as it was instead of the run stopping, and two rows update it."""
    policy = MaskPolicy(sd15_betas(), baseline="loo", reward="loss")
    generator = torch.Generator().manual_seed(0)
    draw = policy.draw(2, generator)
    before = policy.scores.clone()
    out = policy.update(torch.tensor([0.5]), draw["masks"][:1], 0.5, timesteps=draw["timesteps"][:1])
    assert torch.equal(policy.scores, before) and math.isnan(out["score_grad_norm"])
    policy.update(torch.tensor([0.5, 0.1]), draw["masks"], 0.5, timesteps=draw["timesteps"])
    assert not torch.equal(policy.scores, before)
