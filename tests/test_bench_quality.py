"""bench/steps_vs_quality.py: the output format of a tiny run, and the gap-aware reward of eddpm/rewards.py.

The bench runs are format checks only (the models are far too small to say anything about quality); the
reward is checked against a direct DDIM step and a loop over the mask.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from eddpm import masks as M
from eddpm.rewards import ddim_step_weights, gap_rewards, previous_kept_timesteps

REPO_ROOT = Path(__file__).resolve().parents[1]
BENCH = REPO_ROOT / "bench" / "steps_vs_quality.py"
SD15_BETAS = torch.linspace(math.sqrt(0.00085), math.sqrt(0.012), 1000, dtype=torch.float64) ** 2


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
            if init == "ft" and mode.startswith("respaced"):
                methods[f"base/dpmpp/learned-by-ft-{mode}"] = ks
    return methods


def check_output(output_dir: Path, payload: dict) -> None:
    for key in ("command", "machine", "config", "wall_time_s", "metrics", "floor", "results", "masks", "runs"):
        assert key in payload, f"results.json lacks {key!r}; has {sorted(payload)}"
    assert payload["command"].startswith("python ") and "--quick" in payload["command"]
    config = payload["config"]
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
    """The full --quick run (both data sets, every mode, K in {5, 10, 20}, 2 seeds): about 2 minutes."""
    check_output(tmp_path, run_bench(tmp_path))


def test_smoke_run_output_format(tmp_path):
    """The smallest run: 2-D data, K = 5, one seed, one worker (well under a minute)."""
    payload = run_bench(tmp_path, "--datasets", "gmm", "--ks", "5", "--scratch_ks", "5", "--seeds", "1",
                        "--workers", "1", "--max_train_steps", "40")
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
