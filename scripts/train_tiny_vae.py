"""Train the small VAE shipped in models/tiny/vae, so that the tiny and small presets decode images that mean
something: an SD-style AutoencoderKL (8x downsampling, 4 latent channels, scaling factor 0.18215) trained on
freshly rendered synthetic relighting images.

    python scripts/train_tiny_vae.py        # 14 min on one core of a shared 2-core CPU; writes models/tiny/vae

- Data: `eddpm.synthetic.render_example(TRAIN_SEED, i, 128)` for i < --num_examples, a seed the bundled set
  (data/synthetic, seed 0) and bench/relight_accuracy.py (seed 1) do not use. Each example gives its target
  and its condition composited on gray 127 (docs/iclight-facts.md, "Condition encoding"), both at 128 px
  and downscaled to 64 px the way the data pipeline does (`eddpm.images.resize_cover`). Batches are random
  --crop squares with random flips and quarter turns, mapped to the model range with IC-Light's x / 127 - 1.
- Loss (per sample, as SD's VAE): sum |x - D(z)| + --mse_weight * sum (x - D(z))^2 over pixels, plus
  --kl_weight * KL(q(z|x) || N(0, I)) summed over latent elements; z is a posterior sample.
- Afterwards the latent statistics are folded into quant_conv / post_quant_conv (`fold_latent_stats_`, an
  exact reparameterisation), so that mode(E(x)) * 0.18215 has zero mean and unit variance per channel, as
  the diffusion model expects of SD latents, and the stored scaling factor stays SD's 0.18215.
- Reported: the PSNR of decode(encode(x)) on data/synthetic (never trained on), computed through
  `eddpm.conditioning.encode_images` / `decode_latents`, the functions training and the demo use.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere

from eddpm import iclight, synthetic  # noqa: E402
from eddpm.conditioning import composite_on_gray, decode_latents, encode_images  # noqa: E402
from eddpm.examples import load_example  # noqa: E402
from eddpm.images import psnr, resize_cover  # noqa: E402
from eddpm.metadata import read_metadata  # noqa: E402
from eddpm.tiny import TINY_VAE_CONFIG  # noqa: E402

VAE_LATENT_CHANNELS = iclight.LATENT_CHANNELS
TRAIN_SEED = 2  # render seed of the training images: data/synthetic uses 0, bench/relight_accuracy.py 1


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--output_dir", default="models/tiny/vae", help="where config.json and the safetensors go")
    p.add_argument("--data_dir", default="data/synthetic", help="held-out evaluation set (not trained on)")
    p.add_argument("--block_out_channels", type=int, nargs=4, default=(16, 32, 32, 32),
                   help="widths of the 4 VAE levels (TINY_VAE_CONFIG has 16 32 32 32)")
    p.add_argument("--mid_block_attention", action=argparse.BooleanOptionalAction, default=True,
                   help="keep the self-attention of the VAE's middle blocks (as SD's VAE)")
    p.add_argument("--num_examples", type=int, default=300, help="rendered training examples (2 images each)")
    p.add_argument("--max_train_steps", type=int, default=5000, help="optimizer steps")
    p.add_argument("--train_batch_size", type=int, default=4, help="crops per step")
    p.add_argument("--crop", type=int, default=64, help="side of the training crops (a multiple of 8); 64 = the train.py resolution: smaller crops train faster per step but the VAE then generalises worse to whole images (its GroupNorms and attention see other statistics)")
    p.add_argument("--learning_rate", type=float, default=2e-3, help="peak Adam LR, cosine decay to 5%%")
    p.add_argument("--mse_weight", type=float, default=4.0, help="weight of the squared error next to L1")
    p.add_argument("--kl_weight", type=float, default=1e-6, help="weight of the KL term (SD's VAE: 1e-6)")
    p.add_argument("--init_logvar", type=float, default=-6.0, help="initial posterior log-variance")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, batches and posterior samples")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--save_fp16", action=argparse.BooleanOptionalAction, default=True,
                   help="store the weights in float16 (half the file; the PSNR is measured after the cast)")
    return p.parse_args(argv)


def render_pool(seed: int, num_examples: int) -> list[torch.Tensor]:
    """Targets and gray-composited conditions as uint8 tensors: [[2N, 3, 128, 128], [2N, 3, 64, 64]]."""
    big, small = [], []
    for i in range(num_examples):
        ex = synthetic.render_example(seed, i, 128)
        cond = composite_on_gray(ex.condition[..., :3], ex.condition[..., 3].astype(np.float32) / 255)
        for img in (ex.target, cond):
            big.append(img)
            small.append(resize_cover(img, 64, 64))
    return [torch.from_numpy(np.stack(p)).permute(0, 3, 1, 2).contiguous() for p in (big, small)]


def random_batch(pool: list[torch.Tensor], batch_size: int, crop: int, generator: torch.Generator) -> torch.Tensor:
    """Random crops with flips and quarter turns, in IC-Light's model range x / 127 - 1: [B, 3, crop, crop]."""
    out = []
    for _ in range(batch_size):  # a loop over a batch of crops: each has its own size, offset and turn
        images = pool[int(torch.randint(len(pool), (1,), generator=generator))]
        img = images[int(torch.randint(len(images), (1,), generator=generator))]
        top, left = (int(torch.randint(img.shape[-1] - crop + 1, (1,), generator=generator)) for _ in range(2))
        img = img[:, top:top + crop, left:left + crop]
        if torch.rand(1, generator=generator) < 0.5:
            img = img.flip(-1)
        out.append(torch.rot90(img, int(torch.randint(4, (1,), generator=generator)), dims=(-2, -1)))
    return torch.stack(out).float() / iclight.GRAY - 1.0


def vae_loss(vae, x: torch.Tensor, generator: torch.Generator, mse_weight: float, kl_weight: float):
    """Per-sample sums, averaged over the batch: sum|x - x'| + w_mse sum(x - x')^2 + w_kl KL(q || N(0, I))."""
    posterior = vae.encode(x).latent_dist
    recon = vae.decode(posterior.sample(generator)).sample  # [B, 3, H, W]
    err = recon - x
    rec = (err.abs() + mse_weight * err.square()).flatten(1).sum(1)  # [B]
    kl = posterior.kl()  # [B], summed over latent elements
    return (rec + kl_weight * kl).mean(), err.detach().square().mean().item(), kl.detach().mean().item()


@torch.no_grad()
def fold_latent_stats_(vae, mean: torch.Tensor, std: torch.Tensor) -> None:
    """In place: z' = (z - mean) / (std * scaling_factor), folded into the 1x1 convs around the latent.

    quant_conv's mean channels become k (W z + b - mean) with k = 1 / (std * scaling_factor) per channel, its
    log-variance channels gain 2 log k; post_quant_conv takes z' / k + mean instead of z. Decoding the
    new latents gives exactly the old images; mode(E(x)) * scaling_factor then has mean 0 and std 1.
    """
    c = mean.numel()
    k = 1.0 / (std * vae.config.scaling_factor)  # [C]
    q, p = vae.quant_conv, vae.post_quant_conv
    q.weight[:c] *= k[:, None, None, None]
    q.bias[:c] = (q.bias[:c] - mean) * k
    q.bias[c:] += 2.0 * torch.log(k)
    p.bias += torch.einsum("oc,c->o", p.weight[:, :, 0, 0], mean)
    p.weight /= k[None, :, None, None]


def latent_stats(vae, images: torch.Tensor, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of mode(E(x)) (unscaled) over uint8 images [N, 3, H, W]."""
    with torch.no_grad():
        z = torch.cat([vae.encode(b.float() / iclight.GRAY - 1.0).latent_dist.mode()
                       for b in images.split(batch_size)])  # [N, 4, h, w]
    return z.mean((0, 2, 3)), z.std((0, 2, 3))


def heldout_images(data_dir: str, resolution: int) -> dict[str, np.ndarray]:
    """data/synthetic's targets and gray-composited conditions, resized as train.py does: uint8 [N, H, W, 3]."""
    rows, _ = read_metadata(data_dir)
    examples = [load_example(r, data_dir, (resolution, resolution)) for r in rows]
    return {"target": np.stack([e.target for e in examples]),
            "condition": np.stack([e.condition for e in examples])}  # already composited on gray


def evaluate(vae, data_dir: str) -> dict:
    """PSNR of decode_latents(encode_images(x)) and the scaled latents' std, on the held-out set."""
    out = {}
    for res in (64, 128):
        for kind, images in heldout_images(data_dir, res).items():
            latents = encode_images(vae, images)  # [N, 4, res/8, res/8], scaled
            recon = decode_latents(vae, latents)  # uint8 [N, res, res, 3]
            out[f"psnr_{kind}_{res}"] = round(float(np.mean([psnr(a, b) for a, b in zip(images, recon)])), 2)
            out[f"latent_std_{kind}_{res}"] = round(float(latents.std()), 3)
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from diffusers import AutoencoderKL
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # its float16-cast notice fires for every .to(dtype)

    start = time.perf_counter()
    pool = render_pool(TRAIN_SEED, args.num_examples)
    print(f"rendered {args.num_examples} examples ({sum(len(p) for p in pool)} images) "
          f"in {time.perf_counter() - start:.0f} s")
    torch.manual_seed(args.seed)
    config = {**TINY_VAE_CONFIG, "block_out_channels": tuple(args.block_out_channels),
              "mid_block_add_attention": args.mid_block_attention}
    vae = AutoencoderKL(**config).train()
    with torch.no_grad():  # start the posterior narrow: at log-variance 0 its noise would drown the small
        vae.quant_conv.bias[VAE_LATENT_CHANNELS:] = args.init_logvar  # initial means, and learning stalls
    optimizer = torch.optim.Adam(vae.parameters(), lr=args.learning_rate)
    schedule = torch.optim.lr_scheduler.LambdaLR(  # 50 steps of warm-up, then cosine to 5 %
        optimizer, lambda s: min(1.0, (s + 1) / 50) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * s / args.max_train_steps))))
    generator = torch.Generator().manual_seed(args.seed)
    for step in range(1, args.max_train_steps + 1):
        x = random_batch(pool, args.train_batch_size, args.crop, generator)  # [B, 3, crop, crop]
        loss, mse, kl = vae_loss(vae, x, generator, args.mse_weight, args.kl_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == args.max_train_steps:
            print(f"step {step}: loss {loss.item():.1f}, crop PSNR {10 * math.log10(4 / max(mse, 1e-10)):.2f} dB, "
                  f"KL {kl:.0f}, {time.perf_counter() - start:.0f} s")
    vae.eval()
    mean, std = latent_stats(vae, pool[1])
    fold_latent_stats_(vae, mean, std)
    if args.save_fp16:
        vae.to(torch.float16).to(torch.float32)  # measure what is stored
    after = latent_stats(vae, pool[1])
    print(f"latents folded: raw mean {mean.numpy().round(3)} std {std.numpy().round(3)} -> scaled mean "
          f"{(after[0] * vae.config.scaling_factor).numpy().round(3)} std {(after[1] * vae.config.scaling_factor).numpy().round(3)}")

    os.makedirs(args.output_dir, exist_ok=True)
    vae.to(torch.float16 if args.save_fp16 else torch.float32).save_pretrained(args.output_dir, safe_serialization=True)
    vae = AutoencoderKL.from_pretrained(args.output_dir, torch_dtype=torch.float32).eval()  # what users load
    result = {**evaluate(vae, args.data_dir), "train_seconds": round(time.perf_counter() - start),
              "parameters": sum(p.numel() for p in vae.parameters()),
              "file_bytes": os.path.getsize(os.path.join(args.output_dir, "diffusion_pytorch_model.safetensors")),
              "args": vars(args)}
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
