"""bench/steps_vs_quality.py: its models train through eddpm.training.train_step (the step of train.py), with
the policy it is given; the output format of a tiny run; and the gap-aware reward of eddpm/rewards.py.

The training checks record what the denoiser is fed and compare it with the forward process computed here
from SD1.5's betas (a float64 loop); the bench run is a format check only (its models are far too small to
say anything about quality); the reward is checked against a direct DDIM step and a loop over the mask.
"""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from eddpm import masks as M
from eddpm.policy import MaskPolicy, UniformTimesteps
from eddpm.rewards import ddim_step_weights, gap_rewards, previous_kept_timesteps

REPO_ROOT = Path(__file__).resolve().parents[1]
BENCH = REPO_ROOT / "bench" / "steps_vs_quality.py"
sys.path.insert(0, str(BENCH.parent))
import steps_vs_quality as bench  # noqa: E402

T = 1000
SD15_BETAS = torch.linspace(math.sqrt(0.00085), math.sqrt(0.012), T, dtype=torch.float64) ** 2
X0 = (1.5, -1.0)  # every training sample is this point, so x_t's noise part is known exactly


def tiny_config(batch_size: int) -> bench.BenchConfig:
    return bench.BenchConfig(train_batch_size=batch_size, width={"gmm": 16, "digits": 16},
                             depth={"gmm": 1, "digits": 1}, warmup=0.0, ramp_end=0.5)


class RecordingDenoiser(bench.Denoiser):
    """The bench's Denoiser, recording the (x_t [B, D], t [B]) of every call."""

    def __init__(self):
        super().__init__(dim=2, width=16, depth=1)
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x, t):
        self.seen.append((x.detach().clone(), t.detach().clone()))
        return super().forward(x, t)


def standardised_noise(model: RecordingDenoiser, alpha_bar: dict[int, float]) -> torch.Tensor:
    """(x_t - sqrt(a_t) x_0) / sqrt(1 - a_t) of every recorded row, which must be N(0, 1) noise."""
    x_t = torch.cat([x for x, _ in model.seen]).double()  # [N, 2]
    t = torch.cat([t for _, t in model.seen])  # [N]
    a = torch.tensor([alpha_bar[int(i)] for i in t], dtype=torch.float64)[:, None]  # [N, 1]
    return (x_t - a.sqrt() * torch.tensor(X0, dtype=torch.float64)) / (1 - a).sqrt()


def test_ddpm_baseline_sees_every_step_uniformly_at_the_unmasked_noise_level():
    model = RecordingDenoiser()
    data = torch.tensor([X0]).expand(10, 2)
    bench.train(model, data, tiny_config(500), steps=4, seed=0, policy=UniformTimesteps(SD15_BETAS))
    t = torch.cat([t for _, t in model.seen])
    assert t.numel() == 2000, f"the model saw {t.numel()} rows, want 4 steps x 500"
    counts = torch.bincount(t // 100, minlength=10).double()  # 10 bins of 100 steps, 200 rows expected each
    chi2 = float(((counts - 200.0) ** 2 / 200.0).sum())
    assert chi2 < 30.0, f"t is not uniform over 0..999: counts per 100 steps {counts.tolist()}, chi2 {chi2:.1f}"
    assert int(t.min()) < 10 and int(t.max()) > 990, (int(t.min()), int(t.max()))
    alpha_bar, a = {}, 1.0
    for i in range(T):  # the unmasked cumulative product, as a loop
        a *= 1.0 - float(SD15_BETAS[i])
        alpha_bar[i] = a
    z = standardised_noise(model, alpha_bar)
    assert abs(float(z.mean())) < 0.06 and abs(float(z.std()) - 1.0) < 0.05, (float(z.mean()), float(z.std()))


def test_eddpm_model_sees_only_kept_steps_at_their_masked_noise_level():
    """With s fixed at a 0/1 mask (lr 0, a budget that never binds), every row keeps exactly those steps."""
    kept = (50, 200, 600, 999)
    policy = MaskPolicy(SD15_BETAS, mask_mode="paper", reward="loss", lr=0.0)
    with torch.no_grad():
        policy.scores.zero_()[list(kept)] = 1.0
    model = RecordingDenoiser()
    bench.train(model, torch.tensor([X0]).expand(10, 2), tiny_config(400), steps=3, seed=1, policy=policy)
    t = torch.cat([t for _, t in model.seen])
    assert sorted(set(t.tolist())) == list(kept), f"steps seen {sorted(set(t.tolist()))}, kept {kept}"
    alpha_bar, a = {}, 1.0
    for i in range(T):  # Eq. (6) as written: prod over kept i <= t of (1 - beta_i)
        if i in kept:
            a *= 1.0 - float(SD15_BETAS[i])
            alpha_bar[i] = a
    z = standardised_noise(model, alpha_bar)
    assert abs(float(z.mean())) < 0.06 and abs(float(z.std()) - 1.0) < 0.05, (float(z.mean()), float(z.std()))
    assert torch.equal(policy.scores[list(kept)], torch.ones(4, dtype=torch.float64)), "s moved with lr 0"


def test_train_updates_the_scores_the_weights_and_the_ema():
    """train() with train.py's policy (gap reward): s leaves 1 and meets the final budget with s_{T-1} = 1;
    the denoiser moves; what it returns is a separate model holding EMA weights (neither start nor end)."""
    policy = MaskPolicy(SD15_BETAS)
    assert policy.reward == "gap"
    data = bench.load_data("gmm")["train"][:256]
    model = bench.new_model("gmm", tiny_config(64), seed=0)
    start = copy.deepcopy(model)
    ema_model = bench.train(model, data, tiny_config(64), steps=3, seed=0, policy=policy, num_kept=10)
    s = policy.scores
    assert float(s.min()) >= 0.0 and float(s.max()) <= 1.0 and float(s[-1]) == 1.0, (float(s.min()), float(s[-1]))
    assert float(s.sum()) <= 10.0 + 1e-6, f"sum(s) = {float(s.sum())} over the final budget K = 10"
    assert int((s < 0.999).sum()) > 900, "s barely moved from 1"
    assert ema_model is not model
    for name, p in model.named_parameters():
        e, p0 = dict(ema_model.named_parameters())[name], dict(start.named_parameters())[name]
        assert not torch.equal(p, p0), f"{name} did not change"
        assert not torch.equal(e, p) and not torch.equal(e, p0), f"EMA of {name} equals the start or the end"


# ----------------------------------------------------------------------------------- the bench's output


def run_bench(output_dir: Path, *extra: str) -> dict:
    command = [sys.executable, str(BENCH), "--quick", "--output_dir", str(output_dir), *extra]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"bench failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    for name in ("report.md", "results.json", "quality_vs_K.png"):
        assert (output_dir / name).is_file(), f"{name} missing from {sorted(p.name for p in output_dir.iterdir())}"
    return json.loads((output_dir / "results.json").read_text())


def expected_methods(config: dict) -> dict[str, list[int]]:
    """Every method the bench must report, with the K values it must cover."""
    ks = config["ks"]
    methods = {"reference/ddpm-1000": [1000]}
    methods.update({f"base/{kind}/uniform": ks for kind in ("ddpm", "ddim", "dpmpp")})
    for init in config["inits"]:
        init_ks = ks if init == "ft" else [k for k in ks if k in config["scratch_ks"]]
        for mode in config["modes"]:
            samplers = ["eddpm"] + (["dpmpp"] if mode.startswith("respaced") else [])
            for sampler in samplers:
                for steps in ("learned", "uniform"):
                    methods[f"{init}-{mode}/{sampler}/{steps}"] = init_ks
            if mode.startswith("respaced"):
                methods[f"{init}-{mode}/ddim/learned"] = init_ks
            if init == "ft" and mode.startswith("respaced"):
                methods[f"base/dpmpp/learned-by-ft-{mode}"] = ks
            if mode.startswith("respaced") and "searched" in config["samplers"]:
                methods[f"{init}-{mode}/dpmpp/searched"] = init_ks
    methods.update({f"base/dpmpp/{schedule}": ks for schedule in config["samplers"]})  # ays, searched
    return methods


def check_output(output_dir: Path, payload: dict) -> None:
    for key in ("command", "machine", "config", "wall_time_s", "metrics", "floor", "results", "masks", "runs"):
        assert key in payload, f"results.json lacks {key!r}; has {sorted(payload)}"
    assert payload["command"].startswith("python ") and "--quick" in payload["command"]
    config = payload["config"]
    assert "masks_per_step" not in config, "one mask per sample now, as train.py"
    report = (output_dir / "report.md").read_text()
    assert payload["command"] in report, "report.md must quote the exact command"
    table_rows = {line.split("|")[1].strip() for line in report.splitlines() if line.startswith("| ")}
    for name in config["datasets"]:
        results = payload["results"][name]
        expected = expected_methods(config)
        assert set(results) == set(expected), f"{name}: methods differ: {set(results) ^ set(expected)}"
        for method, ks in expected.items():
            assert method in table_rows, f"report.md has no row for {method}"
            assert sorted(int(k) for k in results[method]) == sorted(ks), f"{name} {method}: K {list(results[method])}"
            for k, entry in results[method].items():
                assert entry["nfe"] == int(k), f"{name} {method} K={k}: {entry['nfe']} UNet evaluations"
                assert entry["wall_ms"] > 0
                for metric in payload["metrics"][name]:
                    values = entry[metric]["values"]
                    assert len(values) == config["seeds"], f"{name} {method} K={k} {metric}: {values}"
                    assert all(math.isfinite(v) for v in values + [entry[metric]["std"]]), (name, method, k, metric)
        masks = [m for m in payload["masks"] if m["dataset"] == name]
        assert masks, f"no learned masks recorded for {name}"
        for mask in masks:
            kept = mask["kept_timesteps"]
            assert len(kept) == mask["K"] and kept[0] == 999 and kept == sorted(kept, reverse=True), mask
            assert 0.0 < mask["terminal_alpha_bar"] < 1.0, mask


@pytest.mark.slow
def test_quick_run_output_format(tmp_path):
    """The full --quick run (both data sets, every mode, K in {5, 10, 20}, 2 seeds): a few minutes."""
    check_output(tmp_path, run_bench(tmp_path))


def test_smoke_run_output_format(tmp_path):
    """The smallest run: 2-D data, K = 5, one seed, one worker, a plain-loss and a gap-reward reading."""
    payload = run_bench(tmp_path, "--datasets", "gmm", "--ks", "5", "--scratch_ks", "5", "--seeds", "1",
                        "--workers", "1", "--max_train_steps", "12", "--modes", "paper,respaced-gap")
    assert payload["config"]["datasets"] == ["gmm"] and payload["config"]["ks"] == [5]
    check_output(tmp_path, payload)


# -------------------------------------------------------------------------------- the gap-aware reward


def test_previous_kept_timesteps_matches_a_loop():
    gen = torch.Generator().manual_seed(0)
    masks = torch.bernoulli(torch.full((64, 50), 0.2), generator=gen)
    masks[:, 0] = 0
    masks[0] = 0
    masks[0, 30] = 1
    timesteps = torch.randint(50, (64,), generator=gen)
    timesteps[0] = 30
    got = previous_kept_timesteps(masks, timesteps)
    for b in range(64):
        below = [i for i in range(int(timesteps[b])) if masks[b, i] > 0]
        want = max(below) if below else -1
        assert int(got[b]) == want, f"row {b}: t={int(timesteps[b])}, got {int(got[b])}, want {want}"


def test_ddim_step_weight_is_the_error_of_a_ddim_step():
    """w(t, s) ||eps - eps_hat||^2 equals ||x_s^DDIM - x_s||^2 with x_s the forward process at s, same eps."""
    gen = torch.Generator().manual_seed(1)
    alphas_cumprod = torch.cumprod(1.0 - SD15_BETAS, 0)
    for t, s in ((999, 899), (500, 100), (120, -1), (10, 9)):
        a_t = alphas_cumprod[t]
        a_s = alphas_cumprod[s] if s >= 0 else torch.tensor(1.0, dtype=torch.float64)
        x0, eps = torch.randn(16, generator=gen, dtype=torch.float64), torch.randn(16, generator=gen, dtype=torch.float64)
        eps_hat = eps + 0.3 * torch.randn(16, generator=gen, dtype=torch.float64)
        x_t = a_t.sqrt() * x0 + (1 - a_t).sqrt() * eps
        x0_hat = (x_t - (1 - a_t).sqrt() * eps_hat) / a_t.sqrt()
        ddim = a_s.sqrt() * x0_hat + (1 - a_s).sqrt() * eps_hat
        want = (ddim - (a_s.sqrt() * x0 + (1 - a_s).sqrt() * eps)).pow(2).sum()
        got = ddim_step_weights(a_t.view(1), a_s.view(1)) * (eps - eps_hat).pow(2).sum()
        assert torch.allclose(got, want.view(1), rtol=1e-9), f"t={t}, s={s}: {float(got)} vs {float(want)}"


def test_gap_rewards_respaced_loop_reference():
    """Under respaced, R_b = n_b w(t_b, s_b) L_b with the unmasked alpha-bar at both kept steps."""
    gen = torch.Generator().manual_seed(2)
    masks = M.sample_masks(torch.full((1000,), 0.01, dtype=torch.float64), 8, generator=gen, nonempty=True)
    timesteps = M.sample_timesteps(masks, generator=gen)
    losses = torch.rand(8, generator=gen, dtype=torch.float64)
    got = gap_rewards(losses, masks, timesteps, SD15_BETAS, "respaced")
    alphas_cumprod = torch.cumprod(1.0 - SD15_BETAS, 0)
    for b in range(8):
        t = int(timesteps[b])
        kept_below = [i for i in range(t) if masks[b, i] > 0]
        a_s = float(alphas_cumprod[max(kept_below)]) if kept_below else 1.0
        a_t = float(alphas_cumprod[t])
        w = (math.sqrt(a_s * (1 - a_t) / a_t) - math.sqrt(1 - a_s)) ** 2
        want = float(masks[b].sum()) * w * float(losses[b])
        assert math.isclose(float(got[b]), want, rel_tol=1e-9), f"row {b}: {float(got[b])} vs {want}"
