"""bench/eddpm_overhead.py and bench/train_overhead.py time what train.py runs: the policy step of
eddpm.policy.MaskPolicy with train.py's defaults (compared with eddpm.config.TrainConfig, the source of
those defaults), and eddpm.training.train_step with the DDPM baseline or the mask policy. Tiny sizes only."""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import torch

from eddpm.config import TrainConfig
from eddpm.policy import MaskPolicy, UniformTimesteps

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import eddpm_overhead  # noqa: E402
import train_overhead  # noqa: E402

SD15_BETAS = torch.linspace(math.sqrt(0.00085), math.sqrt(0.012), 1000, dtype=torch.float64) ** 2


def test_the_timed_policy_has_train_py_defaults():
    cfg = TrainConfig()
    policy = MaskPolicy(SD15_BETAS)
    assert eddpm_overhead.describe(policy) == {
        "reward": cfg.pg_reward, "baseline": cfg.pg_baseline,
        "optimizer": {"adam": "Adam", "sgd": "SGD"}[cfg.scores_optimizer], "lr": cfg.scores_lr,
        "max_grad_norm": cfg.scores_max_grad_norm}
    assert policy.mask_mode == cfg.mask_mode


def test_policy_step_starts_from_the_mid_training_scores_every_call():
    g = torch.Generator().manual_seed(0)
    scores = eddpm_overhead.mid_training_scores(g)
    assert math.isclose(float(scores.sum()), eddpm_overhead.BUDGET, rel_tol=1e-9) and float(scores[-1]) == 1.0
    assert int((scores == 0).sum()) > 0 and int((scores == 1).sum()) > 1 and int(((scores > 0) & (scores < 1)).sum()) > 0
    policy = MaskPolicy(SD15_BETAS)
    losses = torch.rand(eddpm_overhead.BATCH, generator=g, dtype=torch.float64)
    with torch.no_grad():
        policy.scores.fill_(0.5)  # whatever s holds before the call is replaced
    for _ in range(2):
        info = eddpm_overhead.policy_step(policy, scores, losses, g)
        s = policy.scores
        assert not torch.equal(s, scores), "the update did not move s"
        assert float((s - scores).abs().max()) < 0.1, "the step did not start from the mid-training s"
        assert float(s.sum()) <= eddpm_overhead.BUDGET + 1e-6 and float(s[-1]) == 1.0, (float(s.sum()), float(s[-1]))
        assert info["score_grad_norm"] > 0


def test_eddpm_overhead_report_has_every_case(tmp_path):
    report = eddpm_overhead.main(["--repeats", "3", "--warmup", "1", "--threads", "1",
                                  "--output", str(tmp_path / "out.json")])
    assert set(report["results"]) == {"full step (paper)", "full step (respaced)", "full step (rescaled)",
                                      "exact projection", "bisection projection"}
    assert report["policy"]["reward"] == "gap" and (tmp_path / "out.json").is_file()


def test_train_overhead_steps_run_train_step_with_each_policy():
    """One timed step per policy on the tiny UNet: both move the weights and the EMA; only EDDPM moves s."""
    from diffusers import UNet2DConditionModel

    from eddpm.tiny import TINY_UNET_CONFIG

    torch.manual_seed(0)
    tiny_unet = UNet2DConditionModel(**{**TINY_UNET_CONFIG, "in_channels": 8})  # without the CLIP parts' import
    gen = torch.Generator().manual_seed(0)
    batch = {"latents": torch.randn(2, 4, 8, 8, generator=gen), "cond_latents": torch.randn(2, 4, 8, 8, generator=gen),
             "prompt_embeds": torch.randn(2, 77, 32, generator=gen)}
    for policy in (UniformTimesteps(SD15_BETAS), MaskPolicy(SD15_BETAS), MaskPolicy(SD15_BETAS, reward="step")):
        unet = copy.deepcopy(tiny_unet).train()
        start = [p.detach().clone() for p in unet.parameters()]
        trainee = train_overhead.make_trainee(unet, policy, torch.zeros(77, 32))
        assert isinstance(trainee.optimizer, torch.optim.AdamW) and trainee.optimizer.defaults["foreach"]
        assert trainee.ema.foreach and trainee.ema.use_ema_warmup
        out = train_overhead.make_step(trainee, seed=0, batch_fn=lambda: batch)()
        assert out.finite and out.losses.shape == (2,), out
        assert any(not torch.equal(p, p0) for p, p0 in zip(unet.parameters(), start)), "weights unchanged"
        assert trainee.ema.optimization_step == 1
        moved = not torch.equal(policy.scores, torch.ones(1000, dtype=torch.float64))
        assert moved == isinstance(policy, MaskPolicy), f"{type(policy).__name__}: s moved = {moved}"
        assert (out.step_errors is not None) == (policy.reward == "step")
