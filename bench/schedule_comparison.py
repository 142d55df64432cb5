"""Learned steps against the best step schedules, over training seeds: combines bench/relight_accuracy.py runs.

    python bench/schedule_comparison.py --runs outputs/ra-s0/results.json outputs/ra-s1/results.json \\
        outputs/ra-s2/results.json --train_logs outputs/train-s0.log outputs/train-s1.log outputs/train-s2.log

Each run is one training seed's model relit with `--steps` (every sampler at each K on that model). Per row
(sampler at K): PSNR and direction accuracy, mean over seeds +- the standard error over seeds. Paired
differences, EDDPM minus another sampler at the same K: each seed's mean over its relights, then the mean over
seeds +- the standard error over seeds (ddof 1; the training seed is the unit, so this includes the spread
between models), and beside it the standard error of all relights pooled (which ignores that spread).
The goal of issue 17: an EDDPM sampler beats the best of uniform DPM-Solver++, AYS and the searched schedule
at K = 10 by at least two standard errors over seeds. Compute: train.py's time from `/usr/bin/time -v` logs,
the search's time from the runs. Writes results.json, results.md and psnr_vs_K.png to --output_dir.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys

import numpy as np

BASELINES = ("uniform_dpmpp_2m", "ays_interp_dpmpp_2m", "searched_dpmpp_2m")
EDDPM = ("eddpm", "eddpm_ddim", "eddpm_dpmpp_2m")
GOAL_STEPS = 10


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", nargs="+", required=True, help="results.json of bench/relight_accuracy.py, one per seed")
    p.add_argument("--reference_runs", nargs="*", default=[], help="results.json of runs with --reference_steps "
                   "whose relights give each sampler's PSNR to the reference image (not counted as seeds)")
    p.add_argument("--train_logs", nargs="*", default=[], help="train.py logs with /usr/bin/time -v output")
    p.add_argument("--output_dir", default="bench/results/schedules_vs_eddpm")
    return p.parse_args(argv)


def mean_se(values) -> tuple[float, float]:
    """Mean and standard error (std with ddof 1 / sqrt(n)); the error is nan for one value."""
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else float("nan")


def train_time(path: str) -> dict:
    """Wall and user CPU seconds of a `/usr/bin/time -v` log."""
    text = open(path).read()
    user = float(re.search(r"User time \(seconds\): ([\d.]+)", text).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", text).group(1)
    seconds = sum(float(x) * 60 ** i for i, x in enumerate(reversed(wall.split(":"))))
    return {"wall_seconds": seconds, "cpu_seconds": user}


def by_key(run: dict) -> dict[tuple[str, int], str]:
    """(sampler, K) -> row name of one run."""
    return {(r["sampler"], r["steps"]): r["name"] for r in run["runs"]}


def paired(runs: list[dict], a: tuple[str, int], b: tuple[str, int], metric: str = "psnr") -> dict | None:
    """PSNR of row a minus row b, paired over the relights both made, per seed and combined, over the runs that
    have both rows (the reference may be in only some); None if no run has both."""
    per_seed, pooled = [], []
    for run in runs:
        names = by_key(run)
        if a not in names or b not in names:
            continue
        theirs = {(x["index"], x["direction"]): x[metric] for x in run["records"][names[b]] if metric in x}
        diff = [x[metric] - theirs[(x["index"], x["direction"])] for x in run["records"][names[a]]
                if (x["index"], x["direction"]) in theirs]
        if not diff:
            continue
        per_seed.append(float(np.mean(diff)))
        pooled += diff
    if not per_seed:
        return None
    mean, se = mean_se(per_seed)
    return {"a": a, "b": b, "per_seed": per_seed, "mean": mean, "se_seeds": se, "se_pooled": mean_se(pooled)[1],
            "relights": len(pooled)}


def summarise(runs: list[dict]) -> dict:
    keys = sorted({k for run in runs for k in by_key(run)}, key=lambda k: (k[1], k[0]))
    rows = {}
    for key in keys:
        having = [run for run in runs if key in by_key(run)]
        stats = [run["rows"][by_key(run)[key]] for run in having]
        rows[f"{key[0]}@{key[1]}"] = {"sampler": key[0], "steps": key[1], "name": by_key(having[0])[key],
                                      "psnr": mean_se([s["psnr"] for s in stats]),
                                      "accuracy": mean_se([s["accuracy"] for s in stats]),
                                      "per_seed_psnr": [s["psnr"] for s in stats]}
    reference = next((k for k in keys if k[0] == "ddim"), None)  # DDIM with --reference_steps
    diffs = []
    for key in keys:
        if key[0] in EDDPM:
            others = [(b, key[1]) for b in BASELINES] + ([reference] if reference else [])
        elif key[0] in BASELINES and reference:  # how far each schedule is from the reference, for the gap
            others = [reference]
        else:
            continue
        diffs += [d for d in (paired(runs, key, other) for other in others) if d is not None]
    return {"rows": rows, "paired": diffs, "goal": goal(rows, diffs)}


def to_reference(runs: list[dict]) -> dict:
    """The samplers' own error in runs that made the reference on the same relights: each row's mean PSNR to
    the reference's image from the same noise, and EDDPM minus each baseline, paired over those relights."""
    keys = sorted({k for run in runs for k in by_key(run)}, key=lambda k: (k[1], k[0]))
    rows = []
    for key in keys:
        near = [run["rows"][by_key(run)[key]]["psnr_to_reference"] for run in runs
                if key in by_key(run) and "psnr_to_reference" in run["rows"][by_key(run)[key]]]
        if near:
            rows.append({"sampler": key[0], "steps": key[1], "name": by_key(runs[0])[key], "psnr": mean_se(near),
                         "runs": len(near)})
    pairs = [d for key in keys if key[0] in EDDPM for b in BASELINES
             if (d := paired(runs, key, (b, key[1]), "psnr_to_reference")) is not None]
    return {"rows": rows, "paired": pairs}


def goal(rows: dict, diffs: list[dict]) -> list[dict]:
    """At K = 10: the best baseline by mean PSNR over seeds, and each EDDPM sampler's margin over it."""
    candidates = [rows[f"{b}@{GOAL_STEPS}"] for b in BASELINES if f"{b}@{GOAL_STEPS}" in rows]
    if not candidates:
        return []
    best = max(candidates, key=lambda r: r["psnr"][0])
    out = []
    for d in diffs:
        if d["b"] == (best["sampler"], GOAL_STEPS) and d["a"][1] == GOAL_STEPS:
            out.append({"eddpm": d["a"][0], "best_baseline": best["sampler"], "mean": d["mean"], "se": d["se_seeds"],
                        "met": bool(d["mean"] > 2 * d["se_seeds"])})
    return out


def plot(summary: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    samplers = sorted({r["sampler"] for r in summary["rows"].values() if r["sampler"] != "ddim"})
    for sampler in samplers:
        pts = sorted((r["steps"], r["psnr"], r["accuracy"]) for r in summary["rows"].values() if r["sampler"] == sampler)
        ks = [p[0] for p in pts]
        style = "-o" if sampler.startswith("eddpm") else "--s"
        axes[0].errorbar(ks, [p[1][0] for p in pts], yerr=[p[1][1] for p in pts], fmt=style, capsize=3, label=sampler)
        axes[1].errorbar(ks, [100 * p[2][0] for p in pts], yerr=[100 * p[2][1] for p in pts], fmt=style, capsize=3,
                         label=sampler)
    for ax, label in zip(axes, ("PSNR vs ground truth (dB)", "direction accuracy (%)")):
        ax.set_xscale("log")
        ax.set_xticks([5, 10, 20], ["5", "10", "20"])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("K (UNet calls per image, each a CFG pair)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_title("mean over training seeds +- standard error over seeds")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown(result: dict) -> str:
    s = result["summary"]
    lines = [f"# EDDPM learned steps against step schedules, {len(result['runs'])} training seeds\n",
             f"`{result['command']}`\n", "Runs: " + ", ".join(f"`{r}`" for r in result["runs"]) + "\n",
             "| K | sampler | PSNR (dB), mean +- SE over seeds | per seed | direction accuracy |",
             "|---|---|---|---|---|"]
    for r in s["rows"].values():
        per = " / ".join(f"{v:.2f}" for v in r["per_seed_psnr"])
        lines.append(f"| {r['steps']} | {r['name']} | {r['psnr'][0]:.2f} +- {r['psnr'][1]:.2f} | {per} | "
                     f"{100 * r['accuracy'][0]:.1f} +- {100 * r['accuracy'][1]:.1f} % |")
    near = result["to_reference"]["rows"]
    if near:
        lines += ["", "PSNR to the reference's image from the same noise (the sampler's own error; the runs that "
                  "made the reference):\n", "| K | sampler | PSNR to the reference image (dB) | runs |",
                  "|---|---|---|---|"]
        lines += [f"| {r['steps']} | {r['name']} | {r['psnr'][0]:.2f} | {r['runs']} |" for r in near]
    if result["to_reference"]["paired"]:
        lines += ["", "Paired differences of the PSNR to the reference image, EDDPM minus the other (positive: EDDPM "
                  "is closer to the 1000-step sample):\n", "| K | EDDPM sampler | minus | per run (dB) | mean | SE "
                  "pooled over relights |", "|---|---|---|---|---|---|"]
        lines += [f"| {d['a'][1]} | {d['a'][0]} | {d['b'][0]} | " + " / ".join(f"{v:+.2f}" for v in d["per_seed"])
                  + f" | {d['mean']:+.2f} | {d['se_pooled']:.2f} ({d['relights']}) |" for d in result["to_reference"]["paired"]]
    lines += ["", "Paired PSNR differences, the first sampler minus the second (the reference only on its subset):\n",
              "| K | sampler | minus | per seed (dB) | mean +- SE over seeds | SE pooled over relights |",
              "|---|---|---|---|---|---|"]
    for d in s["paired"]:
        per = " / ".join(f"{v:+.2f}" for v in d["per_seed"])
        lines.append(f"| {d['a'][1]} | {d['a'][0]} | {d['b'][0]} @ {d['b'][1]} | {per} | {d['mean']:+.3f} +- "
                     f"{d['se_seeds']:.3f} | {d['se_pooled']:.3f} ({d['relights']}) |")
    lines += ["", f"Goal at K = {GOAL_STEPS} (beat the best baseline by two standard errors over seeds):\n"]
    lines += [f"- {g['eddpm']} minus {g['best_baseline']}: {g['mean']:+.3f} +- {g['se']:.3f} dB: "
              f"**{'met' if g['met'] else 'not met'}**" for g in s["goal"]]
    if not s["goal"]:
        lines.append(f"- not assessed: these runs have no EDDPM and baseline rows at K = {GOAL_STEPS}")
    lines += ["", "Compute to obtain each schedule:\n"]
    lines += [f"- {c}" for c in result["compute"]]
    lines.append("\n![PSNR and accuracy against K](psnr_vs_K.png)\n")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    runs = [json.load(open(p)) for p in args.runs]
    summary = summarise(runs)
    compute = []
    for path, log in zip(args.runs, args.train_logs):
        t = train_time(log)
        compute.append(f"`{path}`: train.py {t['wall_seconds']:.0f} s wall, {t['cpu_seconds']:.0f} s CPU (learned "
                       f"steps come with the model)")
    for path, run in zip(args.runs, runs):
        if run.get("search"):
            sr = run["search"]
            compute.append(f"`{path}`: search {sr['teacher_seconds'] + sr['cost_seconds']:.0f} s wall, "
                           f"{sr.get('cpu_seconds', float('nan')):.0f} s CPU ({sr['num_trajectories']} trajectories, "
                           f"{sr['teacher']}, {sr['grid_points']} grid points, {sr['model_calls']} batched calls)")
    compute.append("uniform and AYS: none (AYS's published 10 steps, interpolated)")
    command = "python bench/schedule_comparison.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    to_ref = to_reference([json.load(open(p)) for p in args.reference_runs])
    result = {"command": command, "runs": args.runs, "reference_runs": args.reference_runs, "summary": summary,
              "to_reference": to_ref, "compute": compute}
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "results.json"), "w") as fh:
        json.dump(result, fh, indent=1, default=list)
    plot(summary, os.path.join(args.output_dir, "psnr_vs_K.png"))
    with open(os.path.join(args.output_dir, "results.md"), "w") as fh:
        fh.write(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
