"""CPU overhead of EDDPM's mask-policy step (eddpm/policy.py) next to a training step.

One full mask-policy step at B=16, T=1000 with SD1.5's betas, exactly what train.py's step runs around the
UNet: `MaskPolicy.draw` (non-empty masks, masked alpha-bar, t, alpha-bar_t) and `MaskPolicy.update` on fake
losses (gap reward, leave-one-out score gradient, norm clip, Adam, projection with s_{T-1} pinned), with
train.py's defaults and each mask reading, from the same mid-training s every call. Also each projection
of eddpm/masks.py alone at T=1000 with an active budget of 100 kept steps. Targets (from the issue): full
step under 2 ms, exact projection under 200 us.

    python bench/eddpm_overhead.py [--repeats 2000] [--threads N] [--output bench/results/eddpm_overhead.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from eddpm import masks as M  # noqa: E402
from eddpm.policy import MaskPolicy  # noqa: E402

BATCH = 16  # rows per optimizer step, one mask each
T = 1000  # SD1.5's training steps
BUDGET = 100.0  # K = gamma * T with gamma = 10%
SCORE_LR = 1e-3  # step size of s for the projection cases; only sets how far z lands from the feasible set
FULL_STEP_TARGET_US = 2000.0
PROJECTION_TARGET_US = 200.0


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def time_us(fn, repeats: int, warmup: int) -> dict[str, float]:
    """Median and 10th/90th percentiles of one call to fn, in microseconds, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter_ns()
        fn()
        times.append((time.perf_counter_ns() - start) / 1e3)
    times.sort()
    return {
        "median_us": statistics.median(times),
        "p10_us": times[int(0.1 * (repeats - 1))],
        "p90_us": times[int(0.9 * (repeats - 1))],
    }


def mid_training_scores(generator: torch.Generator) -> torch.Tensor:
    """A plausible s halfway through the ramp: sum(s) = BUDGET, a mix of 0, 1 and interior entries, and
    s_{T-1} = 1 as the gap reward pins it."""
    z = 0.3 * torch.rand(T, generator=generator, dtype=torch.float64)
    z[torch.randperm(T, generator=generator)[:40]] = 1.5  # some steps already certain
    scores = torch.ones(T, dtype=torch.float64)
    scores[:-1] = M.project_capped_simplex(z[:-1], BUDGET - 1.0)
    return scores


def policy_step(policy: MaskPolicy, scores: torch.Tensor, losses: torch.Tensor, generator: torch.Generator) -> dict:
    """One mask-policy step of train.py's `train_step` from s = `scores`: draw B masks and t, update s."""
    with torch.no_grad():
        policy.scores.copy_(scores)
    draw = policy.draw(losses.shape[0], generator)  # masks [B, T], timesteps [B], alpha_bar_t [B]
    return policy.update(losses, draw["masks"], BUDGET / T, timesteps=draw["timesteps"])


def describe(policy: MaskPolicy) -> dict:
    """The settings a MaskPolicy runs with (written into the report, so the figure says what it timed)."""
    group = policy.optimizer.param_groups[0]
    return {"reward": policy.reward, "baseline": policy.baseline, "optimizer": type(policy.optimizer).__name__,
            "lr": group["lr"], "max_grad_norm": policy.max_grad_norm}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2000, help="timed calls per case (after warm-up)")
    parser.add_argument("--warmup", type=int, default=100, help="untimed calls per case before timing")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="torch.set_num_threads; defaults to the cores this process may use")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=Path("bench/results/eddpm_overhead.json"))
    args = parser.parse_args(argv)

    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(sys.argv[1:] if argv is None else argv)])
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(args.seed)
    betas = torch.linspace(math.sqrt(0.00085), math.sqrt(0.012), T, dtype=torch.float64) ** 2  # SD1.5
    scores = mid_training_scores(g)  # [T]
    fake_losses = torch.rand(BATCH, generator=g, dtype=torch.float64)  # [B]

    policies = {mode: MaskPolicy(betas, mask_mode=mode) for mode in M.MASK_MODES}  # train.py's defaults

    # the projection cases: an active input near the budget, s after one gradient step nudged up by 0.01
    masks = M.sample_masks(scores, BATCH, generator=g, nonempty=True)
    z = scores - SCORE_LR * M.score_gradient(fake_losses, masks, scores, baseline="loo") + 0.01
    assert float(z.clamp(0, 1).sum()) > BUDGET, "the projection benchmark needs an active budget"

    cases = {f"full step ({mode})": (lambda p=policy: policy_step(p, scores, fake_losses, g), FULL_STEP_TARGET_US)
             for mode, policy in policies.items()}
    cases["exact projection"] = (lambda: M.project_capped_simplex(z, BUDGET), PROJECTION_TARGET_US)
    cases["bisection projection"] = (lambda: M.project_capped_simplex_bisection(z, BUDGET), None)

    results = {}
    for name, (fn, target) in cases.items():
        stats = time_us(fn, args.repeats, args.warmup)
        if target is not None:
            stats["target_us"] = target
            stats["pass"] = stats["median_us"] < target
        results[name] = stats

    report = {
        "command": command,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": cpu_model(),
        "batch_size": BATCH,
        "num_train_timesteps": T,
        "budget": BUDGET,
        "policy": describe(policies["respaced"]),
        "repeats": args.repeats,
        "warmup": args.warmup,
        "seed": args.seed,
        "results": results,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")

    print(f"`{command}`\n")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu_model()}, "
          f"B={BATCH}, T={T}, budget={BUDGET:g}, {args.repeats} repeats; MaskPolicy {report['policy']}\n")
    print("| case | median (us) | p10 (us) | p90 (us) | target (us) | result |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        target = f"{r['target_us']:.0f}" if "target_us" in r else "-"
        verdict = ("PASS" if r["pass"] else "FAIL") if "pass" in r else "-"
        print(f"| {name} | {r['median_us']:.1f} | {r['p10_us']:.1f} | {r['p90_us']:.1f} | {target} | {verdict} |")
    print(f"\nwritten to {args.output}")
    return report


if __name__ == "__main__":
    main()
