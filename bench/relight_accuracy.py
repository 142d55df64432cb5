"""Does a trained model relight? Light-direction accuracy and PSNR on held-out synthetic conditions.

    python bench/relight_accuracy.py --checkpoint outputs/small          # 101 s on one core of this 2-core CPU

For each of --num held-out conditions (`eddpm.synthetic.render_example(HELDOUT_SEED, i)`, a seed no
training set uses: data/synthetic is seed 0, scripts/train_tiny_vae.py seed 2) and each of the five light
directions, the same object is rendered under that light (the ground truth) and relit from its flat-lit
condition with the synthetic captions' prompt, "<color> <shape>, <temperature> light from the <direction>",
through `eddpm.pipeline.Relighter` (the demo's code path: one pass from noise at 64 px, no highres pass, no
lighting gradient), once per sampler: the EDDPM learned steps and DPM++ 2M SDE Karras with 25 steps.

Reported per sampler: direction accuracy (`synthetic.estimate_light_direction` of the relit image inside the
condition's matte against the requested direction; chance is 1/5), per direction and as a confusion matrix;
PSNR against the ground truth; UNet calls and seconds per image. Two reference rows bound the figures: the
ground-truth targets themselves (the estimator's accuracy; PSNR of their VAE round trip, the best any
relight decoded by this VAE can reach) and the condition copied unchanged (no relighting at all).
Writes results.json, results.md and grid.png (rows: directions; columns per condition: condition, target,
one column per sampler) to --output_dir.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere

from eddpm import data, iclight, synthetic  # noqa: E402

HELDOUT_SEED = 1  # render seed of the evaluation conditions; no training set uses it
SAMPLER_LABELS = {"eddpm": "EDDPM (learned steps)", "dpmpp_2m_sde_karras": "DPM++ 2M SDE Karras"}


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
    p.add_argument("--output_dir", default="bench/results/relight_accuracy")
    return p.parse_args(argv)


def render_under(seed: int, index: int, direction: str, resolution: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """`render_example(seed, index)` lit from `direction` (object, pose, albedo, light colour and condition
    unchanged), rendered at 128 px and downscaled like the data pipeline (`data.resize_cover`), so the images
    look like the training set's.

    Returns (condition on gray 127, target, both uint8 [H, W, 3]; alpha float [H, W]; the example's meta).
    """
    ex = synthetic.render_example(seed, index, 128, direction=direction)
    size = (resolution, resolution)
    alpha = data.resize_cover(ex.condition[..., 3].astype(np.float32) / 255.0, size)
    condition = iclight.composite_on_gray(data.resize_cover(np.ascontiguousarray(ex.condition[..., :3]), size), alpha)
    return condition, data.resize_cover(ex.target, size), alpha, ex.meta


def summarise(records: list[dict]) -> dict:
    """Accuracy (overall, per requested direction), confusion counts [requested][estimated], mean PSNR."""
    dirs = synthetic.DIRECTIONS
    confusion = {r: {e: sum(x["direction"] == r and x["estimated"] == e for x in records) for e in dirs} for r in dirs}
    per_dir = {d: confusion[d][d] / max(sum(confusion[d].values()), 1) for d in dirs}
    out = {"accuracy": sum(x["estimated"] == x["direction"] for x in records) / len(records),
           "accuracy_per_direction": per_dir, "confusion": confusion,
           "psnr": float(np.mean([x["psnr"] for x in records]))}
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
    lines.append("![relights](grid.png)\n")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    from eddpm.pipeline import RelightSettings, load_relighter

    torch.set_num_threads(args.threads)
    command = "python bench/relight_accuracy.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    relighter = load_relighter(checkpoint=args.checkpoint, device="cpu")
    samplers = args.samplers.split(",")
    records: dict[str, list[dict]] = {s: [] for s in samplers}
    records["ground truth"], records["condition copied"] = [], []
    grid = []
    for i in range(args.num):
        examples = [render_under(args.condition_seed, i, d, args.resolution) for d in synthetic.DIRECTIONS]
        if any(not np.array_equal(ex[0], examples[0][0]) for ex in examples):
            raise RuntimeError("the condition changed with the light direction: render_under no longer holds")
        rows = []
        for k, (direction, (condition, target, alpha, meta)) in enumerate(zip(synthetic.DIRECTIONS, examples)):
            prompt = f"{meta['color']} {meta['shape']}, {meta['light_temperature']} light from the {direction}"
            roundtrip = iclight.decode_latents(relighter.vae, iclight.encode_images(relighter.vae, target))[0]
            base = {"index": i, "direction": direction, "prompt": prompt}
            records["ground truth"].append({**base, "estimated": synthetic.estimate_light_direction(target, alpha),
                                            "psnr": data.psnr(roundtrip, target)})
            records["condition copied"].append({**base, "psnr": data.psnr(condition, target),
                                                "estimated": synthetic.estimate_light_direction(condition, alpha)})
            row = [condition, target]
            for sampler in samplers:
                # The empty negative prompt and no added prompt: the captions and the dropped-caption
                # unconditional the model was trained with (IC-Light's defaults are SD1.5 habits).
                settings = RelightSettings(
                    prompt=prompt, width=args.resolution, height=args.resolution, guidance_scale=args.guidance_scale,
                    steps=relighter.learned_steps if sampler == "eddpm" else args.dpm_steps,
                    seed=args.seed + 5 * i + k, highres_scale=1.0, lighting="None", added_prompt="",
                    negative_prompt="", sampler=sampler)
                images, info = relighter.relight(condition, settings)
                records[sampler].append({**base, "estimated": synthetic.estimate_light_direction(images[0], alpha),
                                         "psnr": data.psnr(images[0], target), "unet_calls": info["unet_calls"],
                                         "seconds": info["seconds"]})
                row.append(images[0])
            rows.append(row)
        if i < args.grid_conditions:
            grid.append(rows)
        print(f"condition {i + 1}/{args.num}: " + ", ".join(
            f"{s} {np.mean([x['estimated'] == x['direction'] for x in records[s]]):.2f}" for s in samplers), flush=True)

    names = {**SAMPLER_LABELS, "dpmpp_2m_sde_karras": f"DPM++ 2M SDE Karras, {args.dpm_steps} steps"}
    result = {"command": command, "checkpoint": args.checkpoint, "num_conditions": args.num,
              "resolution": args.resolution, "guidance_scale": args.guidance_scale, "condition_seed": args.condition_seed,
              "learned_steps": relighter.learned_steps,
              "rows": {names.get(k, k): summarise(v) for k, v in records.items()},
              "records": records}
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "results.json"), "w") as fh:
        json.dump(result, fh, indent=1)
    with open(os.path.join(args.output_dir, "results.md"), "w") as fh:
        fh.write(markdown(result))
    from PIL import Image

    headers = ["condition", "target"] + [{"eddpm": "EDDPM"}.get(s, "DPM++" if s.startswith("dpm") else s) for s in samplers]
    Image.fromarray(make_grid(grid, headers)).save(os.path.join(args.output_dir, "grid.png"))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
