"""Figures written next to the results (matplotlib, Agg backend, imported lazily)."""

from __future__ import annotations

import json
import os

import torch


def read_stats(path: str) -> list[dict]:
    """The rows of a stats.jsonl; a line that is not a JSON object (a torn last line after a kill) is dropped."""
    rows = []
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                try:
                    row = json.loads(line)
                except (ValueError, RecursionError):  # RecursionError: a line of deeply nested brackets
                    continue
                if isinstance(row, dict) and isinstance(row.get("step"), int):
                    rows.append(row)
    except FileNotFoundError:
        pass
    return rows


def rewrite_stats(path: str, rows: list[dict]) -> None:
    """Replace stats.jsonl by `rows` atomically (a temporary file, then a rename)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(tmp, path)


def plot_scores(scores: torch.Tensor, kept: torch.Tensor, stats: list[dict], path: str) -> None:
    """scores.png: s over t with the exported steps marked; keep rate gamma_e and sum(s)/T over training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.6))
    s = scores.detach().double().cpu()
    left.plot(range(len(s)), s.numpy(), lw=1, label="keep probability s_t")
    left.scatter(kept.cpu().numpy(), s[kept.cpu()].numpy(), color="C3", s=14, zorder=3,
                 label=f"exported steps ({len(kept)})")
    left.set(xlabel="timestep t", ylabel="s_t", ylim=(-0.03, 1.03), title="Learned keep probabilities")
    left.legend(loc="best", fontsize=8)
    steps = [r["step"] for r in stats]
    T = len(s)
    right.plot(steps, [r["keep_rate"] for r in stats], label="keep rate gamma_e (Eq. 10)")
    right.plot(steps, [r["sum_scores"] / T for r in stats], "--", label="sum(s) / T")
    right.plot(steps, [r["kept_per_mask"] / T for r in stats], ":", label="kept steps per mask / T")
    right.set(xlabel="optimizer step", ylabel="fraction of T", yscale="log", title="Budget over training")
    right.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
