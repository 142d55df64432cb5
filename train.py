"""Train the IC-Light fc UNet with EDDPM (Algorithm 1 of eddpm-algorithm.md) on accelerate.

    python train.py --preset tiny --output_dir outputs/tiny          # CPU, no downloads, ~2 minutes
    accelerate launch train.py --preset iclight --data_dir data/train  # GPUs, weights from download_models.py

Per optimizer step: draw masks m ~ Bernoulli(s), noise the target latent with the masked alpha-bar at a
kept t, predict the noise from [x_t, clean condition], backprop the UNet; then update s by the policy
gradient and project it onto sum(s) <= K_e (the cubic keep-rate schedule); then the EMA.

Outputs in --output_dir: config.json (the resolved config), stats.jsonl, checkpoint-<step>/ (the last
--checkpoints_total_limit), and at the end unet/ (EMA weights), scheduler/ (EDDPMScheduler with the
learned s), iclight_offsets.safetensors, scores.png and samples/step-<step>.png.
One stats.jsonl line per --logging_steps optimizer steps (and at the last step), means over that window:
  step, epoch, lr; loss (mean per-sample loss of the global batch); keep_rate (gamma_e of Eq. 10 at
  progress step / max_train_steps), budget (K_e = keep_rate * T), sum_scores (sum of s after the update);
  kept_per_mask (mean kept steps per drawn mask), alpha_bar_T (mean masked alpha-bar_T(m));
  grad_norm (UNet, before clipping), score_grad_norm (s, before clipping; last step of the window);
  nonfinite_total (optimizer steps skipped for a non-finite loss, whole run);
  scores_rank_spread (max |s_rank - s_rank0| over processes; 0 when every process holds the same s);
  steps_per_sec; loss_tAAA-BBB (mean loss of the samples whose t fell in that range).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

# torch, diffusers and accelerate are imported inside main(), so that `train.py --help` answers at once
from eddpm.config import TrainConfig, resolve_config


def step_seed(seed: int, rank: int, step: int) -> int:
    """The mask/noise generator is re-seeded at every optimizer step, so resuming needs no RNG state."""
    return (seed * 1_000_003 + rank * 7_919 + step) % (2**63)


def main(argv: list[str] | None = None) -> dict:
    cfg = resolve_config(argv)
    import torch
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel
    from tqdm.auto import tqdm

    from eddpm import checkpoint as ckpt
    from eddpm import data, models
    from eddpm.masks import keep_rate
    from eddpm.plots import read_stats
    from eddpm.training import MaskPolicy, diffusion_loss, eps_error, loss_by_timestep_bucket, loss_weights
    from eddpm_scheduler import EDDPMScheduler

    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    # ---- initialise -------------------------------------------------------------------------------
    world_size = int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun and accelerate launch
    accelerator = Accelerator(
        # several processes and no GPU: accelerate starts gloo only when told cpu=True; without it every
        # process would train alone as rank 0 into the same output_dir
        cpu=world_size > 1 and not torch.accelerator.is_available(),
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        mixed_precision=cfg.mixed_precision,
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        project_config=ProjectConfiguration(project_dir=cfg.output_dir,
                                            logging_dir=os.path.join(cfg.output_dir, "logs")),
    )
    if world_size > 1 and accelerator.num_processes != world_size:
        raise SystemExit(f"train.py: launched as {world_size} processes but accelerate started "
                         f"{accelerator.num_processes} ({accelerator.distributed_type}); check `accelerate config`")
    main_proc = accelerator.is_main_process
    say = accelerator.print
    set_seed(cfg.seed)
    if main_proc:
        os.makedirs(cfg.output_dir, exist_ok=True)
        with open(os.path.join(cfg.output_dir, "config.json"), "w") as fh:
            fh.write(cfg.to_json())
    say(f"train.py: resolved config ({accelerator.num_processes} process(es), {accelerator.device}):\n{cfg.to_json()}")

    # ---- build: models, latent cache, optimisers ----------------------------------------------------
    parts = models.load_components(cfg.base_model, cfg.offset_path, seed=cfg.seed)
    unet, vae, text_encoder = parts.unet, parts.vae, parts.text_encoder
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    noise_schedule = EDDPMScheduler.from_config(  # the one schedule; its prediction_type is what the UNet learns
        models.iclight.SD15_SCHEDULER_CONFIG, prediction_type=cfg.prediction_type)
    parts.matte_fn = models.load_matte_fn(cfg.rmbg_path, accelerator.device)
    with accelerator.main_process_first():
        if cfg.synthetic_scenes and not os.path.isfile(os.path.join(cfg.data_dir, "metadata.jsonl")):
            if accelerator.is_main_process:
                from eddpm import synthetic

                say(f"train.py: rendering {cfg.synthetic_scenes} synthetic scenes x 5 lights into {cfg.data_dir}")
                synthetic.generate(cfg.data_dir, cfg.synthetic_scenes, all_directions=True)
        dataset = data.build_latent_cache(
            cfg.data_dir, cfg.cache_dir, vae=vae.to(accelerator.device), text_encoder=text_encoder.to(accelerator.device),
            tokenizer=parts.tokenizer, resolution=cfg.resolution, model_id=None,  # fingerprints VAE, text encoder and tokenizer
            matte_fn=parts.matte_fn, degrade=cfg.degrade,
            flip=cfg.flip, strict=cfg.strict_data, device=accelerator.device, progress=main_proc,
        )
    vae.cpu(), text_encoder.cpu()  # only validation needs them again
    batch_sampler = data.BucketBatchSampler(dataset, cfg.train_batch_size, shuffle=True, seed=cfg.seed)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batch_sampler, num_workers=cfg.dataloader_num_workers)

    optimizer_cls = torch.optim.AdamW
    if cfg.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError as exc:
            raise SystemExit("--use_8bit_adam needs bitsandbytes (pip install bitsandbytes; CUDA only)") from exc
        optimizer_cls = bnb.optim.AdamW8bit
    # foreach: one multi-tensor kernel per group instead of a loop over the UNet's ~700 tensors (torch's
    # default on CUDA already; on the CPU it took the tiny preset's AdamW step from 15 to 11 ms)
    multi_tensor = {} if cfg.use_8bit_adam else {"foreach": True}
    optimizer = optimizer_cls(unet.parameters(), lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                              weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon, **multi_tensor)
    ema = EMAModel(unet.parameters(), decay=cfg.ema_decay, use_ema_warmup=True, power=3 / 4, foreach=True,
                   model_cls=type(unet), model_config=unet.config) if cfg.use_ema else None

    steps_per_epoch = math.ceil(math.ceil(len(loader) / accelerator.num_processes) / cfg.gradient_accumulation_steps)
    max_steps = cfg.max_train_steps or cfg.num_train_epochs * steps_per_epoch
    num_epochs = math.ceil(max_steps / steps_per_epoch)
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=max_steps * accelerator.num_processes)
    unet, optimizer, loader, lr_scheduler = accelerator.prepare(unet, optimizer, loader, lr_scheduler)
    if ema is not None:
        ema.to(accelerator.device)
        accelerator.register_for_checkpointing(ema)
    policy = MaskPolicy(noise_schedule.betas, cfg.mask_mode, cfg.pg_baseline, cfg.scores_lr,
                        cfg.scores_optimizer, cfg.scores_max_grad_norm, reward=cfg.pg_reward)
    T = policy.num_train_timesteps

    # ---- resume -------------------------------------------------------------------------------------
    global_step, nonfinite_total = 0, 0
    resume_path = ckpt.resolve_resume(cfg.output_dir, cfg.resume_from_checkpoint)
    if resume_path:
        accelerator.load_state(resume_path)
        extra = ckpt.load_extra_state(resume_path)
        policy.load_state_dict(extra["policy"])
        global_step, nonfinite_total = extra["global_step"], extra["nonfinite_total"]
        say(f"train.py: resumed from {resume_path} at step {global_step}")
    elif cfg.resume_from_checkpoint:
        say("train.py: no checkpoint to resume from yet; starting fresh")
    stats_path = os.path.join(cfg.output_dir, "stats.jsonl")
    if main_proc:  # drop log lines written after the checkpoint we resume from
        kept_lines = [r for r in read_stats(stats_path) if r["step"] <= global_step]
        with open(stats_path, "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in kept_lines)
        if cfg.report_to != "none":
            accelerator.init_trackers("eddpm-iclight", config={k: str(v) if v is None else v for k, v in vars(cfg).items()})

    def extra_state():
        return {"policy": policy.state_dict(), "global_step": global_step, "nonfinite_total": nonfinite_total}

    # ---- loop: model step, mask-policy step, EMA, log, checkpoint ----------------------------------
    generator = torch.Generator().manual_seed(step_seed(cfg.seed, accelerator.process_index, global_step))
    window: dict[str, list] = {"loss": [], "losses": [], "timesteps": [], "kept": [], "alpha_bar_T": [], "grad_norm": []}
    pending: dict[str, list] = {"losses": [], "masks": [], "timesteps": []}
    micro_bad, nonfinite_run, warned_alpha = False, 0, False
    progress = tqdm(total=max_steps, initial=global_step, disable=not main_proc, desc="train", dynamic_ncols=True)
    t_last, step_last = time.perf_counter(), global_step
    first_epoch, skip = divmod(global_step, steps_per_epoch)
    if global_step >= max_steps:  # resumed from the last step: only export
        first_epoch = num_epochs
    for epoch in range(first_epoch, num_epochs):
        active = loader
        if epoch == first_epoch and skip:
            active = accelerator.skip_first_batches(loader, skip * cfg.gradient_accumulation_steps)
        active.set_epoch(epoch)
        # the batch order is a function of (seed, epoch) alone. Set it on the sampler itself: on several
        # processes accelerate's set_epoch does not reach it through skip_first_batches' wrapper
        # (SkipBatchSampler -> BatchSamplerShard has no .sampler), so a resumed run would replay epoch 0
        batch_sampler.set_epoch(epoch)
        for batch in active:
            with accelerator.accumulate(unet):
                latents = batch["latents"]  # [B, 4, h, w]
                B = latents.shape[0]
                draw = policy.draw(B, generator)
                noise = torch.randn(latents.shape, generator=generator).to(latents)
                drop = torch.rand(B, generator=generator) < cfg.caption_dropout  # [B]
                prompt_embeds = batch["prompt_embeds"].clone()
                prompt_embeds[drop.to(prompt_embeds.device)] = dataset.empty_prompt_embeds.to(prompt_embeds)
                device = latents.device
                weights = loss_weights(draw["alpha_bar_t"], cfg.loss_weighting, cfg.snr_gamma).to(device)
                alpha_bar_t = draw["alpha_bar_t"].to(device)
                plain = diffusion_loss(unet, latents, batch["cond_latents"], prompt_embeds, noise,
                                       draw["timesteps"].to(device), alpha_bar_t,
                                       prediction_type=cfg.prediction_type)  # [B]
                losses = plain * weights  # L_b = C_t ||eps - eps_theta||^2
                loss = losses.mean()
                finite = bool(accelerator.gather(torch.isfinite(loss.detach()).reshape(1)).all())
                if finite:
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        grad_norm = accelerator.clip_grad_norm_(unet.parameters(), cfg.max_grad_norm)
                        window["grad_norm"].append(float(grad_norm))
                    if not micro_bad:
                        optimizer.step()
                else:
                    micro_bad = True
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                # the policy minimises L_b (Eq. 9); the gap reward weights the plain eps error itself
                reward_input = eps_error(plain, alpha_bar_t, cfg.prediction_type) if cfg.pg_reward == "gap" else losses
                pending["losses"].append(accelerator.gather(reward_input.detach().float()).cpu())
                pending["masks"].append(accelerator.gather(draw["masks"].float().to(device)).cpu())
                pending["timesteps"].append(accelerator.gather(draw["timesteps"].to(device)).cpu())
                window["kept"].append(draw["masks"].sum(1))
                window["alpha_bar_T"].append(draw["alpha_bar_T"])
            if not accelerator.sync_gradients:
                continue

            # ---- one optimizer step is complete ------------------------------------------------------
            global_step += 1
            gamma = keep_rate(min(global_step / max_steps, 1.0), cfg.final_keep_rate, cfg.warmup, cfg.ramp_end)
            all_losses, all_masks, all_t = (torch.cat(pending[k]) for k in ("losses", "masks", "timesteps"))
            pending = {k: [] for k in pending}
            if micro_bad:
                nonfinite_total += 1
                nonfinite_run += 1
                micro_bad = False
                policy_stats = {}
                say(f"train.py: non-finite loss at step {global_step}: step skipped ({nonfinite_run} in a row)")
                if nonfinite_run >= cfg.max_nonfinite_steps:
                    path = ckpt.save_checkpoint(accelerator, cfg.output_dir, global_step, extra_state(),
                                                cfg.checkpoints_total_limit)
                    accelerator.end_training()
                    raise SystemExit(f"train.py: {nonfinite_run} non-finite losses in a row; stopped. The weights "
                                     f"before them are in {path}. Try a lower --learning_rate or --mixed_precision bf16.")
            else:
                nonfinite_run = 0
                policy_stats = policy.update(all_losses, all_masks, gamma, timesteps=all_t)
                if ema is not None:
                    ema.step(unet.parameters())
                window["loss"].append(float(all_losses.mean()))
                window["losses"].append(all_losses)
                window["timesteps"].append(all_t)
            generator.manual_seed(step_seed(cfg.seed, accelerator.process_index, global_step))
            progress.update(1)

            if global_step % cfg.logging_steps == 0 or global_step == max_steps:
                now = time.perf_counter()
                kept = torch.cat(window["kept"]).double()
                alpha_T = torch.cat(window["alpha_bar_T"]).double()
                # every process updates its own copy of s from the same gathered data: check they agree
                all_scores = accelerator.gather(policy.scores.to(accelerator.device).unsqueeze(0)).cpu()  # [P, T]
                rank_spread = float((all_scores - all_scores[0]).abs().max())
                row = {
                    "step": global_step, "epoch": epoch, "loss": _mean(window["loss"]),
                    "lr": lr_scheduler.get_last_lr()[0], "keep_rate": gamma, "budget": gamma * T,
                    "sum_scores": float(policy.scores.sum()), "kept_per_mask": float(kept.mean()),
                    "alpha_bar_T": float(alpha_T.mean()), "grad_norm": _mean(window["grad_norm"]),
                    "score_grad_norm": policy_stats.get("score_grad_norm", float("nan")),
                    "nonfinite_total": nonfinite_total, "scores_rank_spread": rank_spread,
                    "steps_per_sec": (global_step - step_last) / max(now - t_last, 1e-9),
                }
                if window["losses"]:
                    row.update(loss_by_timestep_bucket(torch.cat(window["losses"]), torch.cat(window["timesteps"]), T))
                t_last, step_last = now, global_step
                window = {k: [] for k in window}
                progress.set_postfix(loss=f"{row['loss']:.4f}", keep=f"{gamma:.3f}", sum_s=f"{row['sum_scores']:.1f}")
                if main_proc:
                    with open(stats_path, "a") as fh:  # strict JSON: an empty window's NaN mean is written null
                        fh.write(json.dumps({k: _finite_or_none(v) for k, v in row.items()}) + "\n")
                    if cfg.report_to != "none":
                        accelerator.log({k: v for k, v in row.items() if k != "step"}, step=global_step)
                    if rank_spread > 0:
                        say(f"train.py: warning: the processes' keep probabilities differ by up to {rank_spread:.3g} "
                            f"at step {global_step}; they should be identical (non-deterministic score update?)")
                    unmasked_T = float(noise_schedule.alphas_cumprod[-1])
                    if row["alpha_bar_T"] > cfg.alpha_bar_warning and not warned_alpha:
                        warned_alpha = True
                        say(f"train.py: warning: mean masked alpha-bar_T(m) = {row['alpha_bar_T']:.3f}, far above the "
                            f"unmasked {unmasked_T:.4f}: the noisiest training latent is still mostly image, while "
                            "sampling starts from pure noise (eddpm-algorithm.md; try --mask_mode respaced).")

            if cfg.checkpointing_steps and global_step % cfg.checkpointing_steps == 0:
                ckpt.save_checkpoint(accelerator, cfg.output_dir, global_step, extra_state(), cfg.checkpoints_total_limit)
            if main_proc and cfg.validation_steps and global_step % cfg.validation_steps == 0 and global_step < max_steps:
                _validate(cfg, accelerator, unet, ema, parts, dataset, policy, noise_schedule, global_step)
            if global_step >= max_steps:
                break
        if global_step >= max_steps:
            break
    progress.close()

    # ---- export ---------------------------------------------------------------------------------------
    accelerator.wait_for_everyone()
    result = {"output_dir": cfg.output_dir, "global_step": global_step, "nonfinite_total": nonfinite_total}
    if main_proc:
        result.update(_export(cfg, accelerator, unet, ema, parts, dataset, policy, noise_schedule, global_step))
    accelerator.end_training()
    return result


def _final_unet(accelerator, unet, ema):
    """A CPU float32 copy of the trained UNet, with the EMA weights when EMA is on."""
    import copy

    import torch

    final = copy.deepcopy(accelerator.unwrap_model(unet)).to("cpu", torch.float32)
    if ema is not None:
        ema.copy_to(final.parameters())
    return final.eval()


def _eddpm_scheduler(cfg: TrainConfig, policy, noise_schedule):
    """The learned steps as a diffusers scheduler: the training schedule plus s and the mask mode."""
    from eddpm_scheduler import EDDPMScheduler

    num_kept = max(1, round(cfg.final_keep_rate * policy.num_train_timesteps))
    return EDDPMScheduler.from_config(noise_schedule.config, scores=policy.scores.tolist(),
                                      num_kept_steps=num_kept, mask_mode=cfg.mask_mode)


def _validate(cfg, accelerator, unet, ema, parts, dataset, policy, noise_schedule, step, final_unet=None):
    """Relight the first dataset rows' conditions through the demo's code path, with the learned steps."""
    import numpy as np
    from PIL import Image

    from eddpm import data, iclight
    from eddpm.pipeline import Relighter, RelightSettings

    final_unet = final_unet or _final_unet(accelerator, unet, ema)
    scheduler = _eddpm_scheduler(cfg, policy, noise_schedule)
    relighter = Relighter(final_unet, parts.vae, parts.text_encoder, parts.tokenizer, dict(scheduler.config), scheduler)
    os.makedirs(os.path.join(cfg.output_dir, "samples"), exist_ok=True)
    tiles = []
    for i in range(min(cfg.num_validation_images, len(dataset))):
        example = data.load_example(dataset.rows[i], cfg.data_dir, dataset.buckets[i], matte_fn=parts.matte_fn)
        foreground, prompt = iclight.composite_on_gray(example.condition, example.alpha), dataset.rows[i].text
        h, w = foreground.shape[:2]
        settings = RelightSettings(prompt=prompt, width=w, height=h, steps=scheduler.config.num_kept_steps,
                                   guidance_scale=cfg.validation_guidance_scale, seed=cfg.seed + i,
                                   highres_scale=1.0, sampler="eddpm")
        images, info = relighter.relight(foreground, settings)
        tiles.append(np.concatenate([foreground, images[0]], axis=1))  # condition | relit
    grid = np.concatenate(tiles, axis=0) if tiles else None
    path = os.path.join(cfg.output_dir, "samples", f"step-{step:06d}.png")
    if grid is not None:
        Image.fromarray(grid).save(path)
        accelerator.print(f"train.py: validation relights -> {path} ({info['unet_calls']} UNet calls each)")
    return path


def _export(cfg, accelerator, unet, ema, parts, dataset, policy, noise_schedule, step) -> dict:
    """unet/ (EMA), scheduler/ (learned steps), iclight_offsets.safetensors, scores.png, final samples."""
    from eddpm import iclight, models
    from eddpm.plots import plot_scores, read_stats

    out = cfg.output_dir
    final = _final_unet(accelerator, unet, ema)
    final.save_pretrained(os.path.join(out, "unet"), safe_serialization=True)
    scheduler = _eddpm_scheduler(cfg, policy, noise_schedule)
    scheduler.save_pretrained(os.path.join(out, "scheduler"))
    iclight.save_iclight_offsets(final, models.load_base_unet(cfg.base_model, cfg.seed),
                                 os.path.join(out, "iclight_offsets.safetensors"))
    stats = read_stats(os.path.join(out, "stats.jsonl"))
    plot_scores(policy.scores, scheduler.kept_timesteps, stats, os.path.join(out, "scores.png"))
    sample_path = _validate(cfg, accelerator, unet, ema, parts, dataset, policy, noise_schedule, step, final)
    kept = [int(t) for t in scheduler.kept_timesteps]
    accelerator.print(f"train.py: done at step {step}. Learned {len(kept)} steps: {kept}\n"
                      f"  outputs in {out}: unet/, scheduler/, iclight_offsets.safetensors, scores.png, samples/")
    return {"kept_timesteps": kept, "samples": sample_path}


def _mean(values: list[float]) -> float:
    return float(sum(values) / len(values)) if values else float("nan")


def _finite_or_none(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


if __name__ == "__main__":
    main(sys.argv[1:])
