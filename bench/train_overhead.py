"""Training-step cost of EDDPM against plain DDPM training, and of the latent cache, on this machine.

Both loops run `eddpm.training.train_step`, the step of train.py, with train.py's defaults (StepSettings:
caption dropout 0.1, plain eps loss, gradient clip 1; AdamW and EMAModel with foreach=True); same model,
data and batch. They differ only in the policy that chooses t and alpha-bar_t:
  ddpm : eddpm.policy.UniformTimesteps: t ~ U{0..T-1}, the unmasked SD1.5 alpha-bar, no update;
  eddpm: eddpm.policy.MaskPolicy with train.py's defaults: draw (masks, masked alpha-bar, t among kept
         steps) and, after the optimizer step, update (gap reward, score gradient, Adam, projection);
  eddpm_step: the same with reward "step" (`--pg_reward step`): one more UNet forward pass without
         gradients per sample, at each row's midpoint step.
The loops alternate in blocks so that drifting machine load hits both alike; the figure is the median
step time of each. The cache comparison times the tiny preset's EDDPM step with latents read from the
cache against the same step that decodes, mattes and VAE/CLIP-encodes its batch every time (what training
without a cache does).

    python bench/train_overhead.py [--steps 60] [--blocks 6] [--output bench/results/train_overhead.json]

Targets (issue 5): EDDPM at most 3 % slower per step; cached at least 3x the uncached steps/s.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
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

MEDIUM_BLOCKS = (64, 128, 256)  # a "medium" UNet, about 24M parameters
KEEP_FRACTION = 0.1  # a keep rate partway down train.py's ramp; the step's cost barely depends on it


def build_unet(kind: str, seed: int):
    from diffusers import UNet2DConditionModel

    from eddpm.iclight import CONDITION_CHANNELS, LATENT_CHANNELS
    from eddpm.tiny import TINY_UNET_CONFIG, build_tiny_components

    if kind == "tiny":
        return build_tiny_components(seed).unet
    config = {**TINY_UNET_CONFIG, "in_channels": LATENT_CHANNELS + CONDITION_CHANNELS,
              "block_out_channels": MEDIUM_BLOCKS,
              "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
              "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DConditionModel(**config)


def make_trainee(unet, policy, empty_prompt_embeds: torch.Tensor):
    """What train.py's step updates: AdamW and EMAModel (foreach, EMA warm-up) on `unet`, a constant LR."""
    from accelerate import Accelerator
    from diffusers.training_utils import EMAModel

    from eddpm.training import Trainee

    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4, foreach=True)  # as train.py
    ema = EMAModel(unet.parameters(), decay=0.999, use_ema_warmup=True, power=3 / 4, foreach=True)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    return Trainee(Accelerator(cpu=True), unet, optimizer, lr_scheduler, policy, ema, empty_prompt_embeds)


def make_step(trainee, seed: int, batch_fn):
    """One call = one `train_step` on the batch from batch_fn(), its generator re-seeded per step (train.py)."""
    from eddpm.training import StepSettings, step_seed, train_step

    settings, generator, count = StepSettings(), torch.Generator(), iter(range(10**9))

    def step():
        batch = batch_fn()
        generator.manual_seed(step_seed(seed, 0, next(count)))
        return train_step(trainee, [batch], generator, KEEP_FRACTION, settings)

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
    from eddpm.policy import MaskPolicy, UniformTimesteps
    from eddpm.scheduler import EDDPMScheduler

    betas = EDDPMScheduler.from_config(iclight.SD15_SCHEDULER_CONFIG).betas
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=False, drop_last=True)
    batches = [b for _, b in zip(range(4), loader)]
    unet = build_unet(kind, args.seed).train()
    policies = {"ddpm": UniformTimesteps(betas), "eddpm": MaskPolicy(betas), "eddpm_step": MaskPolicy(betas, reward="step")}
    steps = {}
    for mode, policy in policies.items():
        counter = iter(range(10**9))
        trainee = make_trainee(copy.deepcopy(unet), policy, dataset.empty_prompt_embeds)
        steps[mode] = make_step(trainee, args.seed, lambda c=counter: batches[next(c) % len(batches)])
        timed(steps[mode], 3)  # warm-up
    times = {mode: [] for mode in policies}
    for block in range(args.blocks):
        order = list(policies)[block % 3:] + list(policies)[:block % 3]  # each loop in each position in turn
        for mode in order:
            times[mode] += timed(steps[mode], args.steps // args.blocks)
    med = {m: statistics.median(t) for m, t in times.items()}
    return {"model": kind, "params_M": round(sum(p.numel() for p in unet.parameters()) / 1e6, 2),
            "latent": list(batches[0]["latents"].shape), "ddpm_step_s": med["ddpm"], "eddpm_step_s": med["eddpm"],
            "ddpm_steps_per_s": 1 / med["ddpm"], "eddpm_steps_per_s": 1 / med["eddpm"],
            "overhead_pct": 100 * (med["eddpm"] / med["ddpm"] - 1), "eddpm_step_reward_step_s": med["eddpm_step"],
            "step_reward_overhead_pct": 100 * (med["eddpm_step"] / med["eddpm"] - 1), "steps_each": len(times["ddpm"])}


def cached_vs_uncached(dataset, parts, data_dir: str, args) -> dict:
    """Steps/s of the tiny preset's step from the cache against encoding every batch from the files."""
    from eddpm import iclight
    from eddpm.conditioning import encode_images
    from eddpm.examples import load_example
    from eddpm.policy import MaskPolicy
    from eddpm.prompts import encode_prompts
    from eddpm.scheduler import EDDPMScheduler

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
        examples = [load_example(rows[i], data_dir, buckets[i]) for i in idx]
        targets = np.stack([e.target for e in examples])  # [B, H, W, 3] uint8
        conditions = np.stack([e.condition for e in examples])  # already composited on gray
        return {"latents": encode_images(parts.vae, targets), "cond_latents": encode_images(parts.vae, conditions),
                "prompt_embeds": encode_prompts(parts.tokenizer, parts.text_encoder, [rows[i].text for i in idx])}

    unet = parts.unet.train()
    out = {}
    for name, fn in (("cached", cached_batch), ("uncached", uncached_batch)):
        trainee = make_trainee(copy.deepcopy(unet), MaskPolicy(betas), dataset.empty_prompt_embeds)
        step = make_step(trainee, args.seed, fn)
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

    from eddpm import models
    from eddpm.cache import build_latent_cache
    from eddpm.training import StepSettings

    parts = models.load_components("tiny", seed=args.seed)
    results = {"command": "python bench/train_overhead.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
               "cpu": cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__,
               "batch_size": args.batch_size, "keep_fraction": KEEP_FRACTION,
               "step_settings": dataclasses.asdict(StepSettings()), "models": []}
    with tempfile.TemporaryDirectory() as cache:
        datasets = {res: build_latent_cache(args.data_dir, cache, vae=parts.vae, text_encoder=parts.text_encoder,
                                            tokenizer=parts.tokenizer, resolution=res, progress=False)
                    for res in (64, 128)}
        for kind in args.models.split(","):
            results["models"].append(eddpm_vs_ddpm(kind, datasets[64 if kind == "tiny" else 128], args))
        results["cache"] = cached_vs_uncached(datasets[64], parts, args.data_dir, args)

    print(f"\n{results['command']}\n{results['cpu']}, {results['threads']} threads, torch {results['torch']}, "
          f"batch {args.batch_size}\n")
    print("| model | params | latent | DDPM steps/s | EDDPM steps/s | EDDPM overhead | target <= 3% | "
          "--pg_reward step: steps/s, cost over EDDPM |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results["models"]:
        print(f"| {r['model']} | {r['params_M']}M | {'x'.join(map(str, r['latent'][2:]))} | {r['ddpm_steps_per_s']:.2f} "
              f"| {r['eddpm_steps_per_s']:.2f} | {r['overhead_pct']:+.1f}% | {'PASS' if r['overhead_pct'] <= 3 else 'FAIL'} | "
              f"{1 / r['eddpm_step_reward_step_s']:.2f}, {r['step_reward_overhead_pct']:+.1f}% |")
    c = results["cache"]
    print(f"\nTiny preset step: cached {1 / c['cached_step_s']:.2f} steps/s, uncached {1 / c['uncached_step_s']:.2f} "
          f"steps/s: {c['speedup']:.1f}x (target >= 3x: {'PASS' if c['speedup'] >= 3 else 'FAIL'})")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
