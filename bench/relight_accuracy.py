"""Does a trained model relight? Light-direction accuracy and PSNR on held-out synthetic conditions.

    python bench/relight_accuracy.py --checkpoint outputs/small          # 101 s on one core of this 2-core CPU

For each of --num held-out conditions (`eddpm.synthetic.render_example(HELDOUT_SEED, i)`, a seed no
training set uses: data/synthetic is seed 0, scripts/train_tiny_vae.py seed 2) and each of the five light
directions, the same object is rendered under that light (the ground truth) and relit from its flat-lit
condition with the synthetic captions' prompt, "<color> <shape>, <temperature> light from the <direction>",
through `eddpm.relighting.Relighter` (the demo's code path: one pass from noise at 64 px, no highres pass, no
lighting gradient), once per sampler: the EDDPM learned steps and DPM++ 2M SDE Karras with 25 steps.

Reported per sampler: direction accuracy (`synthetic.estimate_light_direction` of the relit image inside the
condition's matte against the requested direction; chance is 1/5), per direction and as a confusion matrix;
PSNR against the ground truth; UNet calls and seconds per image. Two reference rows bound the figures: the
ground-truth targets themselves (the estimator's accuracy; PSNR of their VAE round trip, the best any
relight decoded by this VAE can reach) and the condition copied unchanged (no relighting at all).
Writes results.json, results.md and grid.png (rows: directions; columns per condition: condition, target,
one column per sampler) to --output_dir.

Step schedules at equal steps (`--steps 5,10,20`, README "Learned steps against the best step schedules"):
every sampler runs at each K, and three more samplers run DPM-Solver++ 2M on a fixed list of steps:
`uniform_dpmpp_2m` (evenly spaced from 999), `ays_interp_dpmpp_2m` (Align Your Steps, log-linearly
interpolated to K) and `searched_dpmpp_2m` (searched on this model, eddpm/schedule_search.py, from
--search_trajectories relights of the training conditions, render seed 0). `--reference_steps 1000` adds DDIM
with that many steps on the first --reference_num conditions. results.md then also lists the paired PSNR
differences (mean +- standard error over the relights) of each EDDPM sampler against each other sampler at the
same K; bench/schedule_comparison.py combines several runs (training seeds).

    python bench/relight_accuracy.py --checkpoint DIR --steps 5,10 --reference_steps 1000 --samplers \
        eddpm,eddpm_ddim,eddpm_dpmpp_2m,uniform_dpmpp_2m,ays_interp_dpmpp_2m,searched_dpmpp_2m
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from dataclasses import dataclass, replace

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere

from eddpm import synthetic  # noqa: E402
from eddpm.conditioning import decode_latents, encode_images, prepare_condition  # noqa: E402
from eddpm.images import psnr, resize_cover  # noqa: E402

HELDOUT_SEED = 1  # render seed of the evaluation conditions; no training set uses it
SEARCH_SEED = 0  # render seed of the search's conditions: the training scenes (data/synthetic*), never the held-out ones
SAMPLER_LABELS = {"eddpm": "EDDPM (learned steps)", "dpmpp_2m_sde_karras": "DPM++ 2M SDE Karras"}
# Samplers this bench adds: DPM-Solver++ 2M on a fixed list of steps, built for each K (see `schedule_for`).
SCHEDULE_SAMPLERS = {"uniform_dpmpp_2m": "DPM-Solver++ 2M, uniform steps",
                     "ays_interp_dpmpp_2m": "DPM-Solver++ 2M, Align Your Steps (interpolated)",
                     "searched_dpmpp_2m": "DPM-Solver++ 2M, searched steps"}
STEP_LABELS = {"eddpm": "EDDPM learned steps, DDPM posterior", "eddpm_ddim": "EDDPM learned steps, DDIM",
               "eddpm_dpmpp_2m": "EDDPM learned steps, DPM-Solver++ 2M", **SCHEDULE_SAMPLERS}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a train.py output folder (unet/, scheduler/, config.json)")
    p.add_argument("--num", type=int, default=25, help="held-out conditions; each is relit under all 5 directions")
    p.add_argument("--condition_seed", type=int, default=HELDOUT_SEED,
                   help="render seed of the conditions (0 gives data/synthetic's training conditions, for comparison)")
    p.add_argument("--resolution", type=int, default=64, help="relight size in pixels (a multiple of 64)")
    p.add_argument("--guidance_scale", type=float, default=3.0, help="classifier-free guidance on the text")
    p.add_argument("--dpm_steps", type=int, default=25, help="steps of DPM++ 2M SDE Karras (IC-Light's default 25)")
    p.add_argument("--samplers", default="eddpm,dpmpp_2m_sde_karras", help="comma-separated Relighter sampler keys")
    p.add_argument("--seed", type=int, default=0, help="relight (i, direction) uses seed + 5 i + direction index")
    p.add_argument("--grid_conditions", type=int, default=3, help="conditions shown side by side in grid.png")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--steps", default=None, help="comma-separated K: run every sampler at each K (rows '<name> @ K'; "
                   "EDDPM samplers only up to the learned count) instead of the learned steps / --dpm_steps")
    p.add_argument("--search_trajectories", type=int, default=100,
                   help="relights of training conditions the schedule search runs (teacher trajectories)")
    p.add_argument("--search_teacher_steps", type=int, default=250, help="DDIM steps of the search's teacher")
    p.add_argument("--search_grid_stride", type=int, default=5, help="every n-th teacher step is a grid point")
    p.add_argument("--reference_steps", type=int, default=0, help="also DDIM with this many steps (0: none)")
    p.add_argument("--reference_num", type=int, default=5, help="conditions the --reference_steps row relights")
    p.add_argument("--reuse_search", default=None, help="results.json of an earlier run on the same checkpoint: take "
                   "its searched schedules instead of searching again")
    p.add_argument("--output_dir", default="bench/results/relight_accuracy")
    return p.parse_args(argv)


def render_under(seed: int, index: int, direction: str, resolution: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """`render_example(seed, index)` lit from `direction` (object, pose, albedo, light colour and condition
    unchanged), rendered at 128 px and downscaled like the data pipeline (`prepare_condition` for the
    condition, `resize_cover` for the target and the matte), so the images look like the training set's.

    Returns (condition on gray 127, target, both uint8 [H, W, 3]; alpha float [H, W]; the example's meta).
    """
    ex = synthetic.render_example(seed, index, 128, direction=direction)
    matte = ex.condition[..., 3].astype(np.float32) / 255.0  # [128, 128]
    condition = prepare_condition(np.ascontiguousarray(ex.condition[..., :3]), matte, resolution, resolution)
    alpha = resize_cover(matte, resolution, resolution)
    return condition, resize_cover(ex.target, resolution, resolution), alpha, ex.meta


def summarise(records: list[dict]) -> dict:
    """Accuracy (overall, per requested direction), confusion counts [requested][estimated], mean PSNR."""
    dirs = synthetic.DIRECTIONS
    confusion = {r: {e: sum(x["direction"] == r and x["estimated"] == e for x in records) for e in dirs} for r in dirs}
    per_dir = {d: confusion[d][d] / max(sum(confusion[d].values()), 1) for d in dirs}
    out = {"accuracy": sum(x["estimated"] == x["direction"] for x in records) / len(records),
           "accuracy_per_direction": per_dir, "confusion": confusion,
           "psnr": float(np.mean([x["psnr"] for x in records]))}
    to_ref = [x["psnr_to_reference"] for x in records if "psnr_to_reference" in x]
    if to_ref:
        out["psnr_to_reference"] = float(np.mean(to_ref))
        out["relights_with_reference"] = len(to_ref)
    if "unet_calls" in records[0]:
        out["unet_calls_per_image"] = float(np.mean([x["unet_calls"] for x in records]))
        out["seconds_per_image"] = float(np.mean([x["seconds"] for x in records]))
    return out


def make_grid(tiles: list[list[list[np.ndarray]]], headers: list[str], scale: int = 2) -> np.ndarray:
    """tiles[condition][direction][column] uint8 [h, w, 3] -> one labelled image (rows: directions)."""
    from PIL import Image, ImageDraw

    h, w = tiles[0][0][0].shape[:2]
    cols, rows, pad, label_w, head_h = len(headers), len(synthetic.DIRECTIONS), 4, 56, 16
    th, tw = h * scale, w * scale
    width = label_w + len(tiles) * (cols * tw + pad)
    canvas = Image.new("RGB", (width, head_h + rows * th), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for c, per_condition in enumerate(tiles):
        x0 = label_w + c * (cols * tw + pad)
        for j, name in enumerate(headers):
            draw.text((x0 + j * tw + 2, 2), name, fill=(0, 0, 0))
        for r, row in enumerate(per_condition):
            for j, tile in enumerate(row):
                canvas.paste(Image.fromarray(tile).resize((tw, th), Image.NEAREST), (x0 + j * tw, head_h + r * th))
    for r, d in enumerate(synthetic.DIRECTIONS):
        draw.text((2, head_h + r * th + th // 2 - 5), d, fill=(0, 0, 0))
    return np.asarray(canvas)


def markdown(result: dict) -> str:
    dirs = synthetic.DIRECTIONS
    lines = [f"# Relight accuracy on held-out synthetic conditions\n\n`{result['command']}`\n",
             f"{result['num_conditions']} conditions x 5 directions at {result['resolution']} px, CFG "
             f"{result['guidance_scale']}, checkpoint `{result['checkpoint']}` (learned steps: "
             f"{result['learned_steps']}). Chance accuracy is 20 %.\n",
             "| | UNet calls / image | s / image | direction accuracy | " + " | ".join(dirs) + " | PSNR (dB) |",
             "|---|---|---|---|" + "---|" * len(dirs) + "---|"]
    for name, s in result["rows"].items():
        calls = f"{s['unet_calls_per_image']:.0f}" if "unet_calls_per_image" in s else "-"
        secs = f"{s['seconds_per_image']:.2f}" if "seconds_per_image" in s else "-"
        per = " | ".join(f"{100 * s['accuracy_per_direction'][d]:.0f} %" for d in dirs)
        lines.append(f"| {name} | {calls} | {secs} | **{100 * s['accuracy']:.0f} %** | {per} | {s['psnr']:.2f} |")
    lines.append("\nReference rows: *ground truth* classifies the true targets (the estimator's own accuracy) and "
                 "its PSNR is the targets' VAE round trip (the ceiling for anything this VAE decodes); *condition "
                 "copied* is no relighting at all.\n")
    for name, s in result["rows"].items():
        if "unet_calls_per_image" not in s:
            continue
        lines += [f"Confusion, {name} (rows: requested, columns: estimated):\n",
                  "| | " + " | ".join(dirs) + " |", "|---|" + "---|" * len(dirs)]
        lines += [f"| {r} | " + " | ".join(str(s["confusion"][r][e]) for e in dirs) + " |" for r in dirs]
        lines.append("")
    lines += paired_markdown(result)
    lines.append("![relights](grid.png)\n")
    return "\n".join(lines)


def paired_markdown(result: dict) -> list[str]:
    """The schedules each fixed-list run used, the search's cost, and the paired PSNR differences."""
    lines = []
    fixed = [r for r in result.get("runs", []) if r["timesteps"]]
    if fixed:
        lines += ["Steps of the fixed-list samplers (learned: " + str(result["learned_timesteps"]) + "):\n"]
        lines += [f"- {r['name']}: {r['timesteps']}" for r in fixed] + [""]
    if result.get("search"):
        s = result["search"]
        lines.append(f"Search: {s['num_trajectories']} trajectories, teacher {s['teacher']}, {s['grid_points']} "
                     f"grid points, local step {s['local_step']}; {s['model_calls']} guided model calls on all "
                     f"trajectories, {s['teacher_seconds']:.1f} s teacher + {s['cost_seconds']:.1f} s costs.\n")
    near = {name: row for name, row in result["rows"].items() if "psnr_to_reference" in row}
    if near:
        lines += ["PSNR of each sampler's image against the reference's image from the same noise (its own error; "
                  "the DDPM posterior adds fresh noise, so it is never close):\n",
                  "| sampler | relights | PSNR to the reference image (dB) |", "|---|---|---|"]
        lines += [f"| {name} | {row['relights_with_reference']} | {row['psnr_to_reference']:.2f} |"
                  for name, row in near.items()] + [""]
    if result.get("paired"):
        lines += ["PSNR differences, EDDPM minus the other, paired over the relights both made (mean +- standard "
                  "error):\n", "| K | EDDPM sampler | minus | relights | difference (dB) |", "|---|---|---|---|---|"]
        lines += [f"| {d['steps']} | {d['eddpm']} | {d['other']} | {d['n']} | {d['mean']:+.3f} +- {d['se']:.3f} |"
                  for d in result["paired"]]
        lines.append("")
    return lines


@dataclass
class Run:
    """One row of the table: a sampler at a step count, on the first `num` conditions (None: all)."""

    name: str
    sampler: str  # a Relighter sampler key or a key of SCHEDULE_SAMPLERS
    steps: int
    timesteps: list[int] | None = None  # the fixed list of a SCHEDULE_SAMPLERS run
    num: int | None = None


def search_schedules(relighter, args, counts: list[int]) -> dict:
    """The searched schedules for every K in `counts` on this model (eddpm/schedule_search.py), from
    --search_trajectories relights of the training scenes (render seed 0, each under all five directions) with
    the bench's prompt and guidance. Returns {K: SearchResult}."""
    import torch

    from eddpm.schedule_search import relighter_eps_fn, search_schedule

    conditions, prompts = [], []
    for j in range(args.search_trajectories):
        direction = synthetic.DIRECTIONS[j % 5]
        condition, _, _, meta = render_under(SEARCH_SEED, j // 5, direction, args.resolution)
        conditions.append(condition)
        prompts.append(f"{meta['color']} {meta['shape']}, {meta['light_temperature']} light from the {direction}")
    eps_fn, shape = relighter_eps_fn(relighter, conditions, prompts, args.guidance_scale)
    noise = torch.randn((len(conditions), *shape), generator=torch.Generator().manual_seed(args.seed + 99991))
    with torch.inference_mode():
        return search_schedule(eps_fn, noise, counts, _training_alphas_cumprod(relighter), args.search_teacher_steps,
                               args.search_grid_stride)


def _training_alphas_cumprod(relighter):
    from eddpm.schedule_search import training_alphas_cumprod

    return training_alphas_cumprod(relighter.eddpm_scheduler)


def reused_search(path: str) -> tuple[dict, dict]:
    """The searched schedules {K: object with .timesteps} and the search's description from an earlier results.json."""
    from types import SimpleNamespace

    with open(path) as fh:
        earlier = json.load(fh)
    found = {r["steps"]: SimpleNamespace(timesteps=r["timesteps"]) for r in earlier["runs"]
             if r["sampler"] == "searched_dpmpp_2m"}
    return found, {**earlier["search"], "reused_from": path}


def schedule_for(sampler: str, steps: int, relighter, searched: dict) -> list[int]:
    """The K steps of a SCHEDULE_SAMPLERS sampler on this model's training schedule."""
    from eddpm.schedule_search import ays_timesteps, uniform_timesteps

    if sampler == "uniform_dpmpp_2m":
        return uniform_timesteps(steps, relighter.scheduler_config.get("num_train_timesteps", 1000))
    if sampler == "ays_interp_dpmpp_2m":
        return ays_timesteps(steps, _training_alphas_cumprod(relighter))
    return searched[steps].timesteps


def plan_runs(args, relighter, searched: dict) -> list[Run]:
    """The rows: each sampler once (learned steps / --dpm_steps), or at each K of --steps; then the reference."""
    samplers = args.samplers.split(",")
    learned = relighter.learned_steps
    if args.steps is None:
        runs = [Run(sampler, sampler, learned if sampler == "eddpm" else args.dpm_steps) for sampler in samplers]
    else:
        runs = []
        for k in (int(v) for v in args.steps.split(",")):
            for sampler in samplers:
                if sampler.startswith("eddpm") and k > learned:
                    continue  # a model that learned fewer steps has no K-step EDDPM schedule
                timesteps = schedule_for(sampler, k, relighter, searched) if sampler in SCHEDULE_SAMPLERS else None
                runs.append(Run(f"{STEP_LABELS.get(sampler, sampler)} @ {k}", sampler, k, timesteps))
    if args.reference_steps:
        runs.append(Run(f"DDIM, {args.reference_steps} steps (reference, first {args.reference_num} conditions)",
                        "ddim", args.reference_steps, None, args.reference_num))
    return runs


def relight_once(relighter, condition, settings, run: Run):
    """One relight of `run`: a fixed list runs as DPM-Solver++ 2M on an EDDPMScheduler that keeps exactly those
    steps (eddpm/schedule_search.py searched_scheduler), swapped in for the call."""
    if run.timesteps is None:
        return relighter.relight(condition, settings)
    from eddpm.schedule_search import searched_scheduler

    learned = relighter.eddpm_scheduler
    relighter.eddpm_scheduler = searched_scheduler(learned, run.timesteps)
    try:
        return relighter.relight(condition, replace(settings, sampler="eddpm_dpmpp_2m", steps=len(run.timesteps)))
    finally:
        relighter.eddpm_scheduler = learned


def paired_differences(records: dict[str, list[dict]], runs: list[Run]) -> list[dict]:
    """PSNR of each EDDPM run minus each other run at the same K (and minus the reference), paired over the
    relights both made: mean and standard error (std / sqrt(n), ddof 1) over those relights."""
    out = []
    for a in (r for r in runs if r.sampler.startswith("eddpm")):
        for b in runs:
            is_reference = b.num is not None
            if not is_reference and (b.steps != a.steps or b.sampler.startswith("eddpm")):
                continue
            theirs = {(x["index"], x["direction"]): x["psnr"] for x in records[b.name]}
            diff = np.array([x["psnr"] - theirs[(x["index"], x["direction"])] for x in records[a.name]
                             if (x["index"], x["direction"]) in theirs])
            out.append({"eddpm": a.name, "other": b.name, "steps": a.steps, "n": len(diff),
                        "mean": float(diff.mean()), "se": float(diff.std(ddof=1) / np.sqrt(len(diff)))})
    return out


def relight_condition(relighter, args, i: int, runs: list[Run], records: dict) -> list[list[np.ndarray]]:
    """All runs on the five directions of held-out condition i; appends to `records`, returns the grid rows."""
    from eddpm.settings import RelightSettings

    examples = [render_under(args.condition_seed, i, d, args.resolution) for d in synthetic.DIRECTIONS]
    if any(not np.array_equal(ex[0], examples[0][0]) for ex in examples):
        raise RuntimeError("the condition changed with the light direction: render_under no longer holds")
    rows = []
    for k, (direction, (condition, target, alpha, meta)) in enumerate(zip(synthetic.DIRECTIONS, examples)):
        prompt = f"{meta['color']} {meta['shape']}, {meta['light_temperature']} light from the {direction}"
        roundtrip = decode_latents(relighter.vae, encode_images(relighter.vae, target))[0]
        base = {"index": i, "direction": direction, "prompt": prompt}
        records["ground truth"].append({**base, "estimated": synthetic.estimate_light_direction(target, alpha),
                                        "psnr": psnr(roundtrip, target)})
        records["condition copied"].append({**base, "psnr": psnr(condition, target),
                                            "estimated": synthetic.estimate_light_direction(condition, alpha)})
        row, made = [condition, target], {}
        for run in runs:
            if run.num is not None and i >= run.num:
                continue
            # Exactly the caption the model was trained with: the Relighter joins prompt and added prompt
            # with ", " as IC-Light does, so the caption "subject, light" is split there; and the empty
            # negative prompt, the dropped-caption unconditional (IC-Light's defaults are SD1.5 habits).
            subject, _, light = prompt.partition(", ")
            settings = RelightSettings(
                prompt=subject, width=args.resolution, height=args.resolution, guidance_scale=args.guidance_scale,
                steps=run.steps, seed=args.seed + 5 * i + k, highres_denoise=0.0, lighting="None",
                added_prompt=light, negative_prompt="", sampler=run.sampler)
            images, info = relight_once(relighter, condition, settings, run)
            records[run.name].append({**base, "estimated": synthetic.estimate_light_direction(images[0], alpha),
                                      "psnr": psnr(images[0], target), "unet_calls": info["unet_calls"],
                                      "seconds": info["seconds"]})
            row.append(images[0])
            made[run.name] = images[0]
        reference = next((r.name for r in runs if r.num is not None and r.name in made), None)
        for name, image in made.items():  # the sampler's error: distance to the reference's image from the same noise
            if reference is not None and name != reference:
                records[name][-1]["psnr_to_reference"] = psnr(image, made[reference])
        rows.append(row)
    return rows


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    from eddpm.relighting import load_relighter

    torch.set_num_threads(args.threads)
    command = "python bench/relight_accuracy.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    relighter = load_relighter(checkpoint=args.checkpoint, device="cpu")
    searched, search_info = {}, None
    if args.reuse_search:
        searched, search_info = reused_search(args.reuse_search)
    elif args.steps is not None and "searched_dpmpp_2m" in args.samplers.split(","):
        searched = search_schedules(relighter, args, sorted({int(v) for v in args.steps.split(",")}))
        search_info = next(iter(searched.values())).describe()
        print(f"searched schedules: {({k: r.timesteps for k, r in searched.items()})} "
              f"({search_info['teacher_seconds'] + search_info['cost_seconds']:.1f} s)", flush=True)
    runs = plan_runs(args, relighter, searched)
    records: dict[str, list[dict]] = {run.name: [] for run in runs}
    records["ground truth"], records["condition copied"] = [], []
    grid = []
    for i in range(args.num):
        rows = relight_condition(relighter, args, i, runs, records)
        if i < args.grid_conditions:
            grid.append(rows)
        print(f"condition {i + 1}/{args.num}: " + ", ".join(
            f"{r.name} {np.mean([x['psnr'] for x in records[r.name]]):.2f} dB" for r in runs if records[r.name]),
            flush=True)

    names = {**SAMPLER_LABELS, "dpmpp_2m_sde_karras": f"DPM++ 2M SDE Karras, {args.dpm_steps} steps"}
    if args.steps is None:
        records = {names.get(k, k): v for k, v in records.items()}
        runs = [replace(r, name=names.get(r.name, r.name)) for r in runs]
    result = {"command": command, "checkpoint": args.checkpoint, "num_conditions": args.num,
              "resolution": args.resolution, "guidance_scale": args.guidance_scale, "condition_seed": args.condition_seed,
              "learned_steps": relighter.learned_steps,
              "learned_timesteps": [int(t) for t in relighter.eddpm_scheduler.kept_timesteps],
              "rows": {k: summarise(v) for k, v in records.items()},
              "runs": [{"name": r.name, "sampler": r.sampler, "steps": r.steps, "timesteps": r.timesteps,
                        "num_conditions": r.num or args.num} for r in runs],
              "search": search_info, "paired": paired_differences(records, runs) if args.steps else [],
              "records": records}
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "results.json"), "w") as fh:
        json.dump(result, fh, indent=1)
    with open(os.path.join(args.output_dir, "results.md"), "w") as fh:
        fh.write(markdown(result))
    from PIL import Image

    headers = ["condition", "target"] + [{"eddpm": "EDDPM"}.get(r.sampler, "DPM++" if r.sampler.startswith("dpm")
                                                                else r.sampler) for r in runs if r.num is None]
    grid = [[row[:len(headers)] for row in rows] for rows in grid]  # the reference column only on some
    Image.fromarray(make_grid(grid, headers)).save(os.path.join(args.output_dir, "grid.png"))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
