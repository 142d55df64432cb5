"""Train the IC-Light fc UNet with EDDPM (Algorithm 1 of docs/eddpm-algorithm.md) on accelerate.

    python train.py --preset tiny --output_dir outputs/tiny          # CPU, no downloads, under a minute
    accelerate launch train.py --preset iclight --data_dir data/train  # GPUs, weights from download_models.py

Per optimizer step (`eddpm.training.train_step`): draw masks m ~ Bernoulli(s), noise the target latent with
the masked alpha-bar at a kept t, predict from [x_t, clean condition], backprop the UNet over the step's
micro-batches; then update s by the policy gradient and project it onto sum(s) <= K_e (the cubic keep-rate
schedule); then the EMA. The phases below: set up, build, resume, loop, export.

Outputs in --output_dir: config.json (the resolved config, paths absolute), stats.jsonl, checkpoint-<step>/
(the last --checkpoints_total_limit; safetensors and JSON only), and at the end unet/ (EMA weights, fp16 unless
--export_fp32), scheduler/ (EDDPMScheduler with the learned s), iclight_offsets.safetensors, scores.png and
samples/step-<step>.png. With --lora_rank (eddpm/lora.py) also pytorch_lora_weights.safetensors and
conv_in.safetensors, and unet/ and the offsets hold the adapters merged in.
One stats.jsonl line per --logging_steps optimizer steps (and at the last step), means over that window:
  step, epoch, lr; loss (mean per-sample loss of the global batch, as the mask policy receives it);
  keep_rate (gamma_e of Eq. 10 at progress step / max_train_steps), budget (K_e = keep_rate * T),
  sum_scores (sum of s after the update); kept_per_mask (mean kept steps per drawn mask), alpha_bar_T (mean
  masked alpha-bar_T(m)); grad_norm (UNet, before clipping), score_grad_norm (s, before clipping; last step
  of the window); nonfinite_total (optimizer steps skipped for a non-finite loss, whole run);
  scores_rank_spread (max |s_rank - s_rank0| over processes; 0 when every process holds the same s);
  steps_per_sec; loss_tAAA-BBB (mean loss of the samples whose t fell in that range).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

# torch, diffusers and accelerate are imported inside the phases, so that `train.py --help` answers at once
from eddpm.config import TrainConfig, resolve_config


@dataclass
class Run:
    """What the phases share: the built objects, and the counters the checkpoints carry."""

    cfg: TrainConfig
    accelerator: Any
    trainee: Any  # eddpm.training.Trainee
    parts: Any  # eddpm.models.Components
    dataset: Any
    loader: Any
    batch_sampler: Any
    noise_schedule: Any
    steps_per_epoch: int
    max_steps: int
    global_step: int = 0
    nonfinite_total: int = 0
    nonfinite_run: int = 0
    warned_alpha: bool = False
    clock: list = field(default_factory=list)  # [time, step] at the start of the logging window


def main(argv: list[str] | None = None) -> dict:
    cfg = resolve_config(argv)
    accelerator, lock = set_up(cfg)
    from eddpm.iclight import BadWeightsError, MissingWeightsError
    from eddpm.metadata import DatasetError

    try:
        run = build(cfg, accelerator)
        resume(run)
        train_loop(run)
        return finish(run)
    except (DatasetError, MissingWeightsError, BadWeightsError) as err:  # bad data or weights: one line
        raise SystemExit("train.py: error: " + "; ".join(line.strip() for line in str(err).splitlines()
                                                         if line.strip())) from None
    finally:
        lock.release()


# ---- set up ------------------------------------------------------------------------------------------


def set_up(cfg: TrainConfig):
    """The Accelerator and the output folder with its config.json, locked against a second run (the lock is
    returned, to be released at the end)."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed

    from eddpm.checkpoint import CheckpointError, OutputLock

    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun and accelerate launch
    accelerator = Accelerator(
        # several processes and no GPU: accelerate starts gloo only when told cpu=True; without it every
        # process would train alone as rank 0 into the same output_dir
        cpu=world_size > 1 and not torch.accelerator.is_available(),
        mixed_precision=cfg.mixed_precision,
        kwargs_handlers=[autocast_handler()],
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        project_config=ProjectConfiguration(project_dir=cfg.output_dir,
                                            logging_dir=os.path.join(cfg.output_dir, "logs")),
    )
    if world_size > 1 and accelerator.num_processes != world_size:
        raise SystemExit(f"train.py: launched as {world_size} processes but accelerate started "
                         f"{accelerator.num_processes} ({accelerator.distributed_type}); check `accelerate config`")
    if cfg.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise SystemExit("train.py: --mixed_precision fp16 needs a CUDA GPU (on a CPU accelerate would silently "
                         "train in fp32); use --mixed_precision bf16 or no")
    set_seed(cfg.seed)
    lock = OutputLock(cfg.output_dir)
    if accelerator.is_main_process:
        os.makedirs(cfg.output_dir, exist_ok=True)
        try:
            lock.acquire()
        except CheckpointError as err:
            raise SystemExit(f"train.py: {err}") from None
        with open(os.path.join(cfg.output_dir, "config.json"), "w") as fh:
            fh.write(cfg.to_json())
    accelerator.print(f"train.py: resolved config ({accelerator.num_processes} process(es), {accelerator.device}, "
                      f"mixed precision {accelerator.mixed_precision}):\n{cfg.to_json()}")
    return accelerator, lock


def autocast_handler():
    """Mixed-precision autocast without its weight cache (bench/memory.py builds its Accelerator with it too).

    The cache keeps the half-precision copy of every weight it cast until the forward pass ends: 1.72 GB at
    SD1.5 size, held beside the gradients of the earlier micro-batches under gradient accumulation
    (docs/real-size.md). Each UNet weight is used once per forward, so the cache never saves a cast."""
    from accelerate.utils import AutocastKwargs

    return AutocastKwargs(cache_enabled=False)


# ---- build -------------------------------------------------------------------------------------------


def build(cfg: TrainConfig, accelerator) -> Run:
    """Models, the latent cache and its loader, the optimisers, the LR schedule, the EMA and the mask policy."""
    import torch
    from diffusers.optimization import get_scheduler

    from eddpm import buckets, models
    from eddpm.ema import LowMemoryEMA
    from eddpm.iclight import SD15_SCHEDULER_CONFIG
    from eddpm.policy import MaskPolicy
    from eddpm.scheduler import EDDPMScheduler
    from eddpm.training import Trainee

    parts = models.load_components(cfg.base_model, cfg.offset_path, seed=cfg.seed)
    parts.vae.requires_grad_(False), parts.text_encoder.requires_grad_(False)
    if cfg.gradient_checkpointing:
        parts.unet.enable_gradient_checkpointing()
    if cfg.lora_rank:  # freeze the UNet but adapters and conv_in; the optimizer and EMA then see only those
        from eddpm.lora import LoraSettings, add_lora

        add_lora(parts.unet, LoraSettings.from_config(cfg), seed=cfg.seed)
    noise_schedule = EDDPMScheduler.from_config(  # the one schedule; its prediction_type is what the UNet learns
        SD15_SCHEDULER_CONFIG, prediction_type=cfg.prediction_type)
    parts.matte_fn = models.load_matte_fn(cfg.rmbg_path, accelerator.device)
    dataset = latent_dataset(cfg, accelerator, parts)
    batch_sampler = buckets.BucketBatchSampler(dataset, cfg.train_batch_size, shuffle=True, seed=cfg.seed)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batch_sampler, num_workers=cfg.dataloader_num_workers)
    optimizer = make_optimizer(cfg, parts.unet)
    ema = LowMemoryEMA(parts.unet.parameters(), offload=cfg.offload_ema, decay=cfg.ema_decay, use_ema_warmup=True,
                       power=3 / 4) if cfg.use_ema else None  # made while the UNet is on the CPU
    P = accelerator.num_processes
    steps_per_epoch = math.ceil(math.ceil(len(loader) / P) / cfg.gradient_accumulation_steps)
    max_steps = cfg.max_train_steps or cfg.num_train_epochs * steps_per_epoch
    # accelerate steps a prepared LR scheduler once per process at every optimizer step
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps * P,
                                 num_training_steps=max_steps * P)
    unet, optimizer, loader, lr_scheduler = accelerator.prepare(parts.unet, optimizer, loader, lr_scheduler)
    if ema is not None:
        ema.to(accelerator.device)
    policy = MaskPolicy(noise_schedule.betas, cfg.mask_mode, cfg.pg_baseline, cfg.scores_lr, cfg.scores_optimizer,
                        cfg.scores_max_grad_norm, reward=cfg.pg_reward)
    trainee = Trainee(accelerator, unet, optimizer, lr_scheduler, policy, ema, dataset.empty_prompt_embeds)
    return Run(cfg, accelerator, trainee, parts, dataset, loader, batch_sampler, noise_schedule,
               steps_per_epoch, max_steps)


def latent_dataset(cfg: TrainConfig, accelerator, parts):
    """Render the synthetic scenes if asked, then validate the data and encode what is not cached yet."""
    from eddpm import cache
    from eddpm.sources import open_source

    device = accelerator.device
    with accelerator.main_process_first():
        if cfg.synthetic_scenes and not os.path.isfile(os.path.join(cfg.data_dir, "metadata.jsonl")):
            if accelerator.is_main_process:
                from eddpm import synthetic

                accelerator.print(f"train.py: rendering {cfg.synthetic_scenes} synthetic scenes x 5 lights into "
                                  f"{cfg.data_dir}")
                synthetic.generate(cfg.data_dir, cfg.synthetic_scenes, all_directions=True)
    source = open_source(cfg.data_dir, dataset_name=cfg.dataset_name, image_column=cfg.image_column,
                         conditioning_image_column=cfg.conditioning_image_column, caption_column=cfg.caption_column,
                         mask_column=cfg.mask_column, allow_outside_paths=cfg.allow_outside_paths)
    # every process checks and encodes its share of the rows, then all load the merged manifest
    dataset = cache.build_latent_cache(
        source, cfg.cache_dir, vae=parts.vae.to(device), text_encoder=parts.text_encoder.to(device),
        tokenizer=parts.tokenizer, resolution=cfg.resolution, matte_fn=parts.matte_fn, degrade=cfg.degrade,
        flip=cfg.flip, strict=cfg.strict_data, device=device, progress=accelerator.is_main_process,
        verify=cfg.verify_cache, rank=accelerator.process_index, world_size=accelerator.num_processes,
        barrier=accelerator.wait_for_everyone,
    )
    parts.vae.cpu(), parts.text_encoder.cpu()  # only validation needs them again
    return dataset


def make_optimizer(cfg: TrainConfig, unet):
    """AdamW on the UNet's trained parameters (bitsandbytes' 8-bit AdamW with --use_8bit_adam)."""
    import torch

    # fused: one kernel for all ~700 tensors and no temporary copy of the model (foreach makes one)
    optimizer_cls, extra = torch.optim.AdamW, {"fused": True}
    if cfg.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError as exc:
            raise SystemExit("train.py: --use_8bit_adam needs bitsandbytes (pip install bitsandbytes)") from exc
        optimizer_cls, extra = bnb.optim.AdamW8bit, {}
    trained = [p for p in unet.parameters() if p.requires_grad]  # all, or a LoRA run's adapters and conv_in
    return optimizer_cls(trained, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                         weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon, **extra)


# ---- resume ------------------------------------------------------------------------------------------


def training_state(run: Run) -> dict:
    """Everything a checkpoint holds (eddpm/checkpoint.py writes it as safetensors and JSON)."""
    from eddpm.lora import trainable_state_dict  # the whole UNet, or a LoRA run's adapters and conv_in

    t, acc = run.trainee, run.accelerator
    return {"unet": trainable_state_dict(acc.unwrap_model(t.unet)), "optimizer": t.optimizer.state_dict(),
            "lr_scheduler": t.lr_scheduler.state_dict(), "ema": t.ema.state_dict() if t.ema else {},
            "scaler": acc.scaler.state_dict() if acc.scaler else {}, "policy": t.policy.state_dict(),
            "counters": {"global_step": run.global_step, "nonfinite_total": run.nonfinite_total}}


def resume(run: Run) -> None:
    """Restore a checkpoint (--resume_from_checkpoint) and drop stats.jsonl lines written after it."""
    from eddpm import checkpoint as ckpt
    from eddpm.lora import load_trainable_state_dict
    from eddpm.plots import read_stats, rewrite_stats

    cfg, acc, t = run.cfg, run.accelerator, run.trainee
    try:
        path = ckpt.resolve_resume(cfg.output_dir, cfg.resume_from_checkpoint, say=acc.print)
        state = ckpt.load_state(path) if path else None
    except ckpt.CheckpointError as err:
        raise SystemExit(f"train.py: cannot resume: {err}") from None
    if path:
        # each part is dropped once applied: its tensors map the checkpoint's files, whose pages count as
        # memory until released (at SD1.5 size the three large parts are 8.6 GB; README "Memory")
        try:
            load_trainable_state_dict(acc.unwrap_model(t.unet), state.pop("unet"))
        except ValueError as err:
            raise SystemExit(f"train.py: cannot resume from {path}: {err}") from None
        t.optimizer.load_state_dict(state.pop("optimizer"))
        t.lr_scheduler.load_state_dict(state["lr_scheduler"])
        if t.ema is not None:
            t.ema.load_state_dict(state.pop("ema"))
            t.ema.to(acc.device)
        if acc.scaler is not None:
            acc.scaler.load_state_dict(state["scaler"])
        t.policy.load_state_dict(state["policy"])
        run.global_step, run.nonfinite_total = (state["counters"][k] for k in ("global_step", "nonfinite_total"))
        acc.print(f"train.py: resumed from {path} at step {run.global_step}")
    elif cfg.resume_from_checkpoint:
        acc.print("train.py: no checkpoint to resume from yet; starting fresh")
    if acc.is_main_process:
        stats_path = os.path.join(cfg.output_dir, "stats.jsonl")
        rewrite_stats(stats_path, [r for r in read_stats(stats_path) if r["step"] <= run.global_step])
        if cfg.report_to != "none":
            acc.init_trackers("eddpm-iclight", config={k: str(v) if v is None else v for k, v in vars(cfg).items()})


# ---- loop --------------------------------------------------------------------------------------------


def optimizer_steps(run: Run, epoch: int, skip_steps: int):
    """The epoch's batches grouped into the micro-batches of each optimizer step (the last group may be short)."""
    accum, loader = run.cfg.gradient_accumulation_steps, run.loader
    if skip_steps:  # resuming mid-epoch: the batch order is a function of (seed, epoch), so skip what was done
        loader = run.accelerator.skip_first_batches(loader, skip_steps * accum)
    loader.set_epoch(epoch)
    # set it on the sampler itself too: on several processes accelerate's set_epoch does not reach it through
    # skip_first_batches' wrapper, and a resumed run would replay epoch 0
    run.batch_sampler.set_epoch(epoch)
    group = []
    for batch in loader:
        group.append(batch)
        if len(group) == accum:
            yield group
            group = []
    if group:
        yield group


def train_loop(run: Run) -> None:
    """Optimizer steps until max_steps: train_step, then bookkeeping (log, checkpoint, validation)."""
    import torch
    from tqdm.auto import tqdm

    from eddpm.masks import keep_rate
    from eddpm.training import StatsWindow, StepSettings, step_seed, train_step

    cfg, acc = run.cfg, run.accelerator
    settings, window = StepSettings.from_config(cfg), StatsWindow(run.trainee.policy.num_train_timesteps)
    generator = torch.Generator()
    progress = tqdm(total=run.max_steps, initial=run.global_step, disable=not acc.is_main_process, desc="train",
                    dynamic_ncols=True)
    run.clock = [time.perf_counter(), run.global_step]
    first_epoch, skip = divmod(run.global_step, run.steps_per_epoch)
    num_epochs = math.ceil(run.max_steps / run.steps_per_epoch)
    for epoch in range(first_epoch, num_epochs if run.global_step < run.max_steps else first_epoch):
        for micro_batches in optimizer_steps(run, epoch, skip if epoch == first_epoch else 0):
            generator.manual_seed(step_seed(cfg.seed, acc.process_index, run.global_step))
            gamma = keep_rate(min((run.global_step + 1) / run.max_steps, 1.0), cfg.final_keep_rate, cfg.warmup,
                              cfg.ramp_end)
            out = train_step(run.trainee, micro_batches, generator, gamma, settings)
            run.global_step += 1
            window.add(out)
            progress.update(1)
            after_step(run, out, window, epoch, gamma, progress)
            if run.global_step >= run.max_steps:
                progress.close()
                return
    progress.close()


def after_step(run: Run, out, window, epoch: int, gamma: float, progress) -> None:
    """Non-finite bookkeeping, the stats line, the checkpoint and the validation relights of one step."""
    from eddpm import checkpoint as ckpt
    from eddpm.export import ema_weights, learned_scheduler, validate

    cfg, acc, step = run.cfg, run.accelerator, run.global_step
    run.nonfinite_run = 0 if out.finite else run.nonfinite_run + 1
    run.nonfinite_total += 0 if out.finite else 1
    if not out.finite:
        acc.print(f"train.py: non-finite loss at step {step}: step skipped ({run.nonfinite_run} in a row)")
        if run.nonfinite_run >= cfg.max_nonfinite_steps:
            path = ckpt.save_checkpoint(acc, cfg.output_dir, step, training_state(run), cfg.checkpoints_total_limit)
            acc.end_training()
            raise SystemExit(f"train.py: {run.nonfinite_run} non-finite losses in a row; stopped. The weights "
                             f"before them are in {path}. Try a lower --learning_rate or --mixed_precision bf16.")
    if step % cfg.logging_steps == 0 or step == run.max_steps:
        log_row(run, window, epoch, gamma, progress)
    if cfg.checkpointing_steps and step % cfg.checkpointing_steps == 0:
        try:
            ckpt.save_checkpoint(acc, cfg.output_dir, step, training_state(run), cfg.checkpoints_total_limit)
        except ckpt.CheckpointError as err:
            raise SystemExit(f"train.py: {err}") from None
    if acc.is_main_process and cfg.validation_steps and step % cfg.validation_steps == 0 and step < run.max_steps:
        unet, policy = acc.unwrap_model(run.trainee.unet), run.trainee.policy
        with ema_weights(unet, run.trainee.ema):
            validate(cfg, acc, unet, run.parts, run.dataset,
                     learned_scheduler(policy, run.noise_schedule, cfg.final_keep_rate, cfg.mask_mode), step)


def log_row(run: Run, window, epoch: int, gamma: float, progress) -> None:
    """One stats.jsonl line (and tracker log) for the window that ends now, plus the two run-time warnings."""
    cfg, acc, policy = run.cfg, run.accelerator, run.trainee.policy
    T, now = policy.num_train_timesteps, time.perf_counter()
    # every process updates its own copy of s from the same gathered data: check that they agree
    all_scores = acc.gather(policy.scores.to(acc.device).unsqueeze(0)).cpu()  # [P, T]
    row = {"step": run.global_step, "epoch": epoch, "lr": run.trainee.lr_scheduler.get_last_lr()[0],
           "keep_rate": gamma, "budget": gamma * T, "sum_scores": float(policy.scores.sum()),
           "nonfinite_total": run.nonfinite_total,
           "scores_rank_spread": float((all_scores - all_scores[0]).abs().max()),
           "steps_per_sec": (run.global_step - run.clock[1]) / max(now - run.clock[0], 1e-9), **window.row()}
    run.clock = [now, run.global_step]
    progress.set_postfix(loss=f"{row['loss']:.4f}", keep=f"{gamma:.3f}", sum_s=f"{row['sum_scores']:.1f}")
    if not acc.is_main_process:
        return
    with open(os.path.join(cfg.output_dir, "stats.jsonl"), "a") as fh:  # strict JSON: a NaN mean is written null
        fh.write(json.dumps({k: v if not isinstance(v, float) or math.isfinite(v) else None
                             for k, v in row.items()}) + "\n")
    if cfg.report_to != "none":
        acc.log({k: v for k, v in row.items() if k != "step"}, step=run.global_step)
    if row["scores_rank_spread"] > 0:
        acc.print(f"train.py: warning: the processes' keep probabilities differ by up to "
                  f"{row['scores_rank_spread']:.3g} at step {run.global_step}; they should be identical")
    if row["alpha_bar_T"] > cfg.alpha_bar_warning and not run.warned_alpha:
        run.warned_alpha = True
        acc.print(f"train.py: warning: mean masked alpha-bar_T(m) = {row['alpha_bar_T']:.3f}, far above the unmasked "
                  f"{float(run.noise_schedule.alphas_cumprod[-1]):.4f}: the noisiest training latent is still mostly "
                  "image, while sampling starts from pure noise (docs/eddpm-algorithm.md; try --mask_mode respaced).")


# ---- export ------------------------------------------------------------------------------------------


def finish(run: Run) -> dict:
    """The final weights (EMA when on) into the UNet, the optimiser state freed, then eddpm.export.export."""
    from eddpm.export import export, learned_scheduler

    cfg, acc, t = run.cfg, run.accelerator, run.trainee
    acc.wait_for_everyone()
    result = {"output_dir": cfg.output_dir, "global_step": run.global_step, "nonfinite_total": run.nonfinite_total}
    if acc.is_main_process:
        unet = acc.unwrap_model(t.unet)
        if t.ema is not None:
            t.ema.copy_to(unet.parameters())
        t.optimizer, t.lr_scheduler, t.ema = None, None, None
        acc.free_memory()  # the optimizer state, before export loads the base UNet for the offsets
        scheduler = learned_scheduler(t.policy, run.noise_schedule, cfg.final_keep_rate, cfg.mask_mode)
        result.update(export(cfg, acc, unet, run.parts, run.dataset, scheduler, run.global_step))
    acc.end_training()
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
