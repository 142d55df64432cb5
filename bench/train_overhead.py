"""Training-step cost of EDDPM against plain DDPM training, and of the latent cache, on this machine.

Same model, data and batch for both loops; they differ only in how t and alpha-bar_t are chosen:
  ddpm : t ~ U{0..T-1}, alpha-bar_t from the unmasked SD1.5 schedule, no mask policy;
  eddpm: MaskPolicy.draw (masks, masked alpha-bar, t among kept steps) and MaskPolicy.update after the
         optimizer step (score gradient, projection), as train.py does.
Both run `eddpm.training.diffusion_loss`, backward, AdamW and an EMA step. The two loops alternate in
blocks so that drifting machine load hits both alike; the figure is the median step time of each.
The cache comparison times the tiny preset's step with latents read from the cache against the same
step that decodes, mattes and VAE/CLIP-encodes its batch every time (what training without a cache does).

    python bench/train_overhead.py [--steps 60] [--blocks 6] [--output bench/results/train_overhead.json]

Targets (issue 5): EDDPM at most 3 % slower per step; cached at least 3x the uncached steps/s.
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from eddpm_overhead import cpu_model  # noqa: E402

MEDIUM_BLOCKS = (64, 128, 256)  # environment.md's "medium" UNet, about 12.5M parameters


def build_unet(kind: str, seed: int):
    from diffusers import UNet2DConditionModel

    from eddpm import iclight

    tiny = iclight.build_tiny_components(seed)
    if kind == "tiny":
        return tiny.unet
    config = {**iclight.TINY_UNET_CONFIG, "in_channels": 8, "block_out_channels": MEDIUM_BLOCKS,
              "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
              "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DConditionModel(**config)


def make_step(unet, policy, mode: str, generator: torch.Generator, batch_fn):
    """One optimizer step of `mode` ('ddpm' or 'eddpm') on the batch from batch_fn(); returns a closure."""
    from diffusers.training_utils import EMAModel

    from eddpm.training import diffusion_loss

    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4, foreach=True)  # as train.py
    ema = EMAModel(unet.parameters(), decay=0.999, foreach=True)
    alphas_cumprod = torch.cumprod(1.0 - policy.betas, 0)  # unmasked SD1.5 alpha-bar, [T]

    def step():
        batch = batch_fn()
        B = batch["latents"].shape[0]
        if mode == "eddpm":
            draw = policy.draw(B, generator)
            timesteps, alpha_bar_t = draw["timesteps"], draw["alpha_bar_t"]
        else:
            timesteps = torch.randint(0, policy.num_train_timesteps, (B,), generator=generator)
            alpha_bar_t = alphas_cumprod[timesteps]
        noise = torch.randn(batch["latents"].shape, generator=generator)
        losses = diffusion_loss(unet, batch["latents"], batch["cond_latents"], batch["prompt_embeds"], noise,
                                timesteps, alpha_bar_t)
        losses.mean().backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if mode == "eddpm":
            policy.update(losses.detach(), draw["masks"], keep_fraction=0.1)
        ema.step(unet.parameters())

    return step


def timed(step, n: int) -> list[float]:
    out = []
    for _ in range(n):
        start = time.perf_counter()
        step()
        out.append(time.perf_counter() - start)
    return out


def eddpm_vs_ddpm(kind: str, dataset, args) -> dict:
    from eddpm import iclight
    from eddpm.training import MaskPolicy
    from eddpm_scheduler import EDDPMScheduler

    betas = EDDPMScheduler.from_config(iclight.SD15_SCHEDULER_CONFIG).betas
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=False, drop_last=True)
    batches = [b for _, b in zip(range(4), loader)]
    unet = build_unet(kind, args.seed).train()
    steps = {}
    for mode in ("ddpm", "eddpm"):
        policy = MaskPolicy(betas, mask_mode="respaced", baseline="loo", lr=0.5)
        counter = iter(range(10**9))
        steps[mode] = make_step(copy.deepcopy(unet), policy, mode, torch.Generator().manual_seed(args.seed),
                                lambda c=counter: batches[next(c) % len(batches)])
        timed(steps[mode], 3)  # warm-up
    times = {"ddpm": [], "eddpm": []}
    for block in range(args.blocks):
        order = ("ddpm", "eddpm") if block % 2 == 0 else ("eddpm", "ddpm")
        for mode in order:
            times[mode] += timed(steps[mode], args.steps // args.blocks)
    med = {m: statistics.median(t) for m, t in times.items()}
    return {"model": kind, "params_M": round(sum(p.numel() for p in unet.parameters()) / 1e6, 2),
            "latent": list(batches[0]["latents"].shape), "ddpm_step_s": med["ddpm"], "eddpm_step_s": med["eddpm"],
            "ddpm_steps_per_s": 1 / med["ddpm"], "eddpm_steps_per_s": 1 / med["eddpm"],
            "overhead_pct": 100 * (med["eddpm"] / med["ddpm"] - 1), "steps_each": len(times["ddpm"])}


def cached_vs_uncached(dataset, parts, data_dir: str, args) -> dict:
    """Steps/s of the tiny preset's step from the cache against encoding every batch from the files."""
    from eddpm import data, iclight
    from eddpm.training import MaskPolicy
    from eddpm_scheduler import EDDPMScheduler

    betas = EDDPMScheduler.from_config(iclight.SD15_SCHEDULER_CONFIG).betas
    rows, buckets = dataset.rows, dataset.buckets
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=False, drop_last=True)
    cached_batches = iter(())
    position = [0]

    def cached_batch():
        nonlocal cached_batches
        batch = next(cached_batches, None)
        if batch is None:
            cached_batches = iter(loader)
            batch = next(cached_batches)
        return batch

    @torch.no_grad()
    def uncached_batch():  # what each step costs without the cache: decode, matte, resize, encode
        idx = [(position[0] + i) % len(rows) for i in range(args.batch_size)]
        position[0] += args.batch_size
        examples = [data.load_example(rows[i], data_dir, buckets[i]) for i in idx]
        targets = torch.from_numpy(np.stack([e.target for e in examples])).permute(0, 3, 1, 2).float()
        conditions = torch.from_numpy(np.stack([e.condition for e in examples])).permute(0, 3, 1, 2).float()
        alpha = torch.from_numpy(np.stack([e.alpha for e in examples]))[:, None]  # [B, 1, H, W]
        return {"latents": iclight.encode_images(parts.vae, targets),
                "cond_latents": iclight.encode_condition(parts.vae, conditions, alpha),
                "prompt_embeds": iclight.encode_prompts(parts.tokenizer, parts.text_encoder, [rows[i].text for i in idx])}

    unet = parts.unet.train()
    out = {}
    for name, fn in (("cached", cached_batch), ("uncached", uncached_batch)):
        policy = MaskPolicy(betas, mask_mode="respaced")
        step = make_step(copy.deepcopy(unet), policy, "eddpm", torch.Generator().manual_seed(args.seed), fn)
        timed(step, 2)
        out[f"{name}_step_s"] = statistics.median(timed(step, max(6, args.steps // 4)))
    out["speedup"] = out["uncached_step_s"] / out["cached_step_s"]
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="timed steps per loop and model")
    parser.add_argument("--blocks", type=int, default=6, help="alternating blocks the steps are split into")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data_dir", default="data/synthetic")
    parser.add_argument("--models", default="tiny,medium", help="comma list of tiny, medium")
    parser.add_argument("--output", default="bench/results/train_overhead.json")
    args = parser.parse_args(argv)

    from eddpm import data, models

    parts = models.load_components("tiny", seed=args.seed)
    results = {"command": "python bench/train_overhead.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
               "cpu": cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__,
               "batch_size": args.batch_size, "models": []}
    with tempfile.TemporaryDirectory() as cache:
        datasets = {res: data.build_latent_cache(args.data_dir, cache, vae=parts.vae, text_encoder=parts.text_encoder,
                                                 tokenizer=parts.tokenizer, resolution=res, progress=False)
                    for res in (64, 128)}
        for kind in args.models.split(","):
            results["models"].append(eddpm_vs_ddpm(kind, datasets[64 if kind == "tiny" else 128], args))
        results["cache"] = cached_vs_uncached(datasets[64], parts, args.data_dir, args)

    print(f"\n{results['command']}\n{results['cpu']}, {results['threads']} threads, torch {results['torch']}, "
          f"batch {args.batch_size}\n")
    print("| model | params | latent | DDPM steps/s | EDDPM steps/s | EDDPM overhead | target <= 3% |")
    print("|---|---|---|---|---|---|---|")
    for r in results["models"]:
        print(f"| {r['model']} | {r['params_M']}M | {'x'.join(map(str, r['latent'][2:]))} | {r['ddpm_steps_per_s']:.2f} "
              f"| {r['eddpm_steps_per_s']:.2f} | {r['overhead_pct']:+.1f}% | {'PASS' if r['overhead_pct'] <= 3 else 'FAIL'} |")
    c = results["cache"]
    print(f"\nTiny preset step: cached {1 / c['cached_step_s']:.2f} steps/s, uncached {1 / c['uncached_step_s']:.2f} "
          f"steps/s: {c['speedup']:.1f}x (target >= 3x: {'PASS' if c['speedup'] >= 3 else 'FAIL'})")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
