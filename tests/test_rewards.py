"""eddpm/rewards.py's step reward against ODEs solved in closed form, and through eddpm.training.train_step.

For data that is one point x*, eps(x_t) = (x_t - sqrt(a_t) x*) / sqrt(1 - a_t) is exact and DDIM follows the
probability-flow ODE exactly: one step and two steps agree. For Gaussian data N(0, sigma^2), the exact eps is
sqrt(1 - a) x / (a sigma^2 + 1 - a) and the ODE's solution is x_s = x_t sqrt(v_s / v_t), v = a sigma^2 + 1 - a;
a first-order step's error falls linearly with its length, and step doubling recovers half of it.
"""

from __future__ import annotations

import math

import pytest
import torch

from eddpm import rewards as R
from eddpm.policy import MaskPolicy

T = 1000
SD15_BETAS = torch.linspace(math.sqrt(0.00085), math.sqrt(0.012), T, dtype=torch.float64) ** 2
ALPHAS_CUMPROD = torch.cumprod(1.0 - SD15_BETAS, 0)
SIGMA = 0.5  # std of the Gaussian data


def gaussian_eps(x, a):
    return (1 - a).sqrt() * x / (a * SIGMA**2 + 1 - a)


def exact_gaussian_flow(x_t, a_t, a_s):
    return x_t * ((a_s * SIGMA**2 + 1 - a_s) / (a_t * SIGMA**2 + 1 - a_t)).sqrt()


def level(t: int) -> torch.Tensor:
    return ALPHAS_CUMPROD[t] if t >= 0 else torch.tensor(1.0, dtype=torch.float64)


def doubling(x_t, t, s, eps_fn):
    m = int(R.midpoint_timesteps(torch.tensor([t]), torch.tensor([s])))
    a_t, a_m, a_s = level(t), level(m), level(s)
    x_m = R.ddim_to(x_t, a_t.view(1), eps_fn(x_t, a_t), a_m.view(1))
    error = R.step_doubling_errors(x_t, eps_fn(x_t, a_t), x_m, eps_fn(x_m, a_m), a_t.view(1), a_m.view(1),
                                   a_s.view(1))
    one = R.ddim_to(x_t, a_t.view(1), eps_fn(x_t, a_t), a_s.view(1))
    return float(error), one


def test_midpoints():
    t, s = torch.tensor([999, 999, 10, 10, 1, 0, 7]), torch.tensor([899, -1, 9, -1, -1, -1, 3])
    assert R.midpoint_timesteps(t, s).tolist() == [949, 499, 9, 5, 0, 0, 5]


@pytest.mark.parametrize("t,s", [(999, 500), (999, -1), (400, 20), (50, -1), (10, 9)])
def test_no_error_where_ddim_is_exact(t, s):
    x_star = torch.tensor([[1.5, -1.0, 0.25]], dtype=torch.float64)
    eps = torch.randn(1, 3, generator=torch.Generator().manual_seed(t), dtype=torch.float64)
    x_t = level(t).sqrt() * x_star + (1 - level(t)).sqrt() * eps
    error, one = doubling(x_t, t, s, lambda x, a: (x - a.sqrt() * x_star) / (1 - a).sqrt())
    assert error < 1e-20
    target = x_star if s < 0 else level(s).sqrt() * x_star + (1 - level(s)).sqrt() * eps
    torch.testing.assert_close(one, target, rtol=0, atol=1e-9)


def test_on_a_curved_flow_doubling_finds_half_the_one_step_error():
    x_t = torch.randn(1, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x_t = x_t * (level(600) * SIGMA**2 + 1 - level(600)).sqrt()
    previous = math.inf
    for s in (100, 400, 500, 560, 590):  # ever shorter steps from t = 600
        error, one = doubling(x_t, 600, s, gaussian_eps)
        true_error = float((one - exact_gaussian_flow(x_t, level(600), level(s))).pow(2).mean())
        assert error < previous
        previous = error
        ratio = math.sqrt(error / true_error)
        assert 0.3 < ratio < 0.6, (s, ratio)  # first order: one step's error is twice the doubling difference
    assert 0.45 < ratio < 0.55


def test_step_rewards_scale_by_the_kept_steps():
    masks = torch.zeros(3, T)
    masks[0, [999]] = 1
    masks[1, [999, 500, 3]] = 1
    masks[2, :10] = 1
    masks[2, 999] = 1
    got = R.step_rewards(torch.tensor([2.0, 2.0, 0.5]), masks)
    assert got.tolist() == [2.0, 6.0, 5.5]


def test_the_step_reward_needs_respaced_and_the_errors():
    with pytest.raises(ValueError, match="respaced"):
        MaskPolicy(SD15_BETAS, mask_mode="paper", reward="step")
    policy = MaskPolicy(SD15_BETAS, reward="step", optimizer="sgd", lr=0.1)
    draw = policy.draw(4, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="step errors"):
        policy.update(torch.ones(4), draw["masks"], 0.5, timesteps=draw["timesteps"])


class GaussianDataUNet(torch.nn.Module):
    """Wraps the tiny UNet (so that training has gradients) but answers with the exact eps of N(0, SIGMA^2)
    data at the pretrained level of each row's timestep (the output adds 0 times the UNet's)."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet
        self.calls: list[torch.Tensor] = []

    def forward(self, sample, timestep, encoder_hidden_states):
        out = self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states)
        self.calls.append(timestep.detach().clone())
        a = ALPHAS_CUMPROD[timestep.long()].view(-1, 1, 1, 1)
        x = sample[:, :4].double()
        out.sample = (gaussian_eps(x, a)).to(out.sample.dtype) + 0.0 * out.sample
        return out


def test_train_step_hands_the_policy_the_step_errors(tiny_components):
    """With the exact eps of Gaussian data the rows' errors are those computed here from the replayed draw;
    the model is called once at t and once, without gradients, at each row's midpoint."""
    import copy

    from accelerate import Accelerator

    from eddpm.training import StepSettings, Trainee, train_step

    class Recording(MaskPolicy):
        def update(self, losses, masks, keep_fraction, timesteps=None, step_errors=None):
            self.seen = step_errors.clone()
            return super().update(losses, masks, keep_fraction, timesteps=timesteps, step_errors=step_errors)

    policy = Recording(SD15_BETAS, reward="step")
    with torch.no_grad():
        policy.scores.fill_(0.01)
        policy.scores[-1] = 1.0
    unet = GaussianDataUNet(copy.deepcopy(tiny_components.unet).train())
    optimizer = torch.optim.SGD(unet.parameters(), lr=0.0)
    trainee = Trainee(Accelerator(cpu=True), unet, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1),
                      policy, None, empty_prompt_embeds=torch.zeros(77, 32))
    gen = torch.Generator().manual_seed(4)
    batch = {"latents": SIGMA * torch.randn(6, 4, 8, 8, generator=gen), "cond_latents": torch.randn(6, 4, 8, 8, generator=gen),
             "prompt_embeds": torch.randn(6, 77, 32, generator=gen)}
    draw_scores = policy.scores.clone()
    train_step(trainee, [batch], torch.Generator().manual_seed(9), 0.01, StepSettings(caption_dropout=0.0))

    replay = torch.Generator().manual_seed(9)
    replayer = MaskPolicy(SD15_BETAS, reward="step")
    with torch.no_grad():
        replayer.scores.copy_(draw_scores)
    draw = replayer.draw(6, replay)
    noise = torch.randn(batch["latents"].shape, generator=replay)
    want = []
    for b in range(6):
        t = int(draw["timesteps"][b])
        kept = [i for i in range(t) if draw["masks"][b, i] > 0]
        s = max(kept) if kept else -1
        x_t = (level(t).sqrt() * batch["latents"][b:b + 1].double() + (1 - level(t)).sqrt() * noise[b:b + 1].double())
        want.append(doubling(x_t.float().double(), t, s, gaussian_eps)[0])
    torch.testing.assert_close(policy.seen.double(), torch.tensor(want, dtype=torch.float64), rtol=2e-3, atol=1e-9)
    assert len(unet.calls) == 2 and torch.equal(unet.calls[0], draw["timesteps"])
    prev = R.previous_kept_timesteps(draw["masks"], draw["timesteps"])
    assert torch.equal(unet.calls[1], R.midpoint_timesteps(draw["timesteps"], prev))
