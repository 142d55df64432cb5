"""Training configuration: one dataclass, named presets as plain Python, flags generated from the fields.

Resolution order: the dataclass defaults, then the preset, then any flag given on the command line.
Relative paths of the defaults and presets are relative to the repository (where `data/synthetic` and
`download_models.py`'s `models/` are); relative paths given as flags are relative to the working directory.
Both become absolute, so train.py and every output folder work from any directory. The resolved config is
printed at start and written to `<output_dir>/config.json`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PATH_FIELDS = ("data_dir", "dataset_name", "output_dir", "cache_dir", "base_model", "offset_path", "rmbg_path")


def _f(default, help: str, **kw):  # noqa: A002 - `help` mirrors argparse
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    # --- what to train on ---------------------------------------------------------------------------
    preset: str = _f("tiny", "Named preset whose values replace the defaults below (tiny, small, iclight, "
                     "iclight_lora).",
                     choices=("tiny", "small", "iclight", "iclight_lora"))
    data_dir: str = _f("data/synthetic", "Folder with metadata.jsonl and the images it names, or webdataset tar "
                       "shards: a .tar file, a brace pattern (shards-{000..099}.tar) or a folder of .tar files "
                       "(data/README.md, 'Inputs').")
    dataset_name: typing.Optional[str] = _f(None, "A local Hugging Face datasets dataset instead of data_dir: a "
                                            "save_to_disk folder or parquet files (a file, folder or glob).")
    image_column: str = _f("image", "dataset_name's column of the target image.")
    conditioning_image_column: typing.Optional[str] = _f(None, "dataset_name's column of the condition image "
                                                         "(paired rows); None: unpaired.")
    caption_column: str = _f("text", "dataset_name's column of the prompt.")
    mask_column: typing.Optional[str] = _f(None, "dataset_name's column of a grayscale matte of the condition.")
    synthetic_scenes: int = _f(0, "If > 0 and data_dir has no metadata.jsonl yet: first render this many synthetic "
                               "scenes, each under all five lights, into data_dir (eddpm/synthetic.py, seed 0).")
    output_dir: str = _f("outputs/tiny", "Where config.json, unet/, scheduler/, checkpoints and plots go.")
    cache_dir: str = _f(".cache/latents", "Latent cache (float16 safetensors shards and a manifest per dataset and "
                        "settings), keyed by file content, model, size and preprocessing, so it is shared safely "
                        "between runs and output folders.")
    verify_cache: bool = _f(False, "Hash every source file again instead of trusting the manifest's sizes and "
                            "modification times (a launch on a built cache otherwise opens no image).")
    base_model: str = _f("tiny", "Base SD1.5 in diffusers layout (folder or hub id), or 'tiny' for the small "
                         "models built in code (CPU, no downloads).")
    offset_path: typing.Optional[str] = _f(None, "IC-Light fc offsets (safetensors) added to the base UNet; "
                                           "None trains from the widened base. With base_model 'tiny': a tiny run's "
                                           "iclight_offsets.safetensors, to fine-tune that model.")
    rmbg_path: typing.Optional[str] = _f(None, "BriaRMBG folder, used only for rows with neither an alpha "
                                         "channel nor a mask file; None skips such rows with a message.")
    resolution: int = _f(64, "Target side in pixels: buckets have about resolution**2 pixels, sides multiples "
                         "of 64.")
    degrade: str = _f("none", "Appearance degradation of the condition for unpaired rows (eddpm/examples.py).")
    flip: bool = _f(False, "Random horizontal flip that also swaps left/right in the prompt.")
    strict_data: bool = _f(False, "Stop at the first bad row instead of skipping it with a message.")
    allow_outside_paths: bool = _f(False, "Let metadata.jsonl name files outside data_dir (../x, absolute paths, "
                                   "links leading out); by default such rows are skipped, so a downloaded "
                                   "dataset reads nothing else on this machine.")
    caption_dropout: float = _f(0.1, "Probability of replacing a prompt by the empty prompt, so that "
                                "classifier-free guidance works at inference.")
    dataloader_num_workers: int = _f(0, "DataLoader workers; the cached latents are small, 0 is usually best.")

    # --- optimisation of the UNet ---------------------------------------------------------------------
    train_batch_size: int = _f(8, "Images per device per micro-batch.")
    gradient_accumulation_steps: int = _f(1, "Micro-batches per optimizer step.")
    num_train_epochs: int = _f(1, "Epochs, used when max_train_steps is None (giving --num_train_epochs without "
                               "--max_train_steps clears a preset's max_train_steps).")
    max_train_steps: typing.Optional[int] = _f(None, "Optimizer steps; overrides num_train_epochs. The keep-rate "
                                               "schedule is counted in these steps.")
    learning_rate: float = _f(1e-4, "Peak AdamW learning rate of the UNet.")
    lr_scheduler: str = _f("constant_with_warmup", "diffusers.optimization.get_scheduler name.",
                           choices=("linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                                    "constant_with_warmup"))
    lr_warmup_steps: int = _f(0, "Linear LR warm-up in optimizer steps.")
    adam_beta1: float = _f(0.9, "AdamW beta1.")
    adam_beta2: float = _f(0.999, "AdamW beta2.")
    adam_weight_decay: float = _f(1e-2, "AdamW decoupled weight decay.")
    adam_epsilon: float = _f(1e-8, "AdamW epsilon.")
    use_8bit_adam: bool = _f(False, "bitsandbytes' AdamW8bit: 2 bytes of optimizer state per parameter instead of "
                             "8 (1.7 GB instead of 6.9 GB at SD1.5 size); runs on CUDA and on CPUs.")
    max_grad_norm: float = _f(1.0, "Gradient-norm clip of the UNet.")
    mixed_precision: str = _f("no", "no, fp16 (with loss scaling) or bf16; master weights stay fp32.",
                              choices=("no", "fp16", "bf16"))
    gradient_checkpointing: bool = _f(False, "Recompute UNet activations in backward to save memory.")
    use_ema: bool = _f(True, "Keep an EMA of the UNet (diffusers EMAModel); the exported unet/ is the EMA.")
    offload_ema: bool = _f(False, "Keep the EMA weights in CPU memory (updated tensor by tensor after each step): "
                           "saves 3.4 GB of GPU memory at SD1.5 size for a few percent of step time.")
    ema_decay: float = _f(0.999, "EMA decay (with EMAModel's warm-up, so short runs are not stuck at init).")
    loss_weighting: str = _f("none", "C_t of the loss (eddpm/losses.py loss_weights): none (1, IC-Light's), "
                             "min_snr (Min-SNR-gamma) or truncated_snr (max(1, 1/SNR_t): the x0 error at the "
                             "noisiest steps; the small preset uses it).",
                             choices=("none", "min_snr", "truncated_snr"))
    snr_gamma: float = _f(5.0, "gamma of Min-SNR weighting.")
    prediction_type: str = _f("epsilon", "What the UNet predicts: epsilon (IC-Light's and SD1.5's weights) or "
                              "v_prediction (for a UNet trained from scratch, as the small preset: at the noisiest "
                              "steps an eps model must copy x_t almost exactly to say anything about the image). "
                              "Stored in scheduler/, so every sampler reads it.",
                              choices=("epsilon", "v_prediction"))
    num_threads: typing.Optional[int] = _f(None, "torch CPU threads (torch.set_num_threads); None keeps torch's "
                                           "default. The CPU presets use 1: a tiny step is not faster with more, and "
                                           "on a shared machine the default was many times slower.")
    seed: int = _f(0, "Seed of everything: weights of tiny models, data order, masks, noise, timesteps.")

    # --- LoRA: train low-rank adapters instead of the whole UNet (eddpm/lora.py) ---------------------------
    lora_rank: int = _f(0, "Rank r of the LoRA adapters; 0 trains the whole UNet. With r > 0 the UNet is frozen "
                        "except the adapters and conv_in (trained whole: the condition enters there); the "
                        "optimizer, the EMA and the checkpoints hold only those, and the run also writes "
                        "pytorch_lora_weights.safetensors and conv_in.safetensors.")
    lora_alpha: typing.Optional[float] = _f(None, "LoRA alpha: the update is (alpha / r) B A. None means alpha = "
                                            "r. The exported LoRA file has alpha / r folded into B.")
    lora_dropout: float = _f(0.0, "Dropout on the adapters' input during training.")
    lora_target_modules: str = _f("to_k,to_q,to_v,to_out.0", "Comma-separated layer names that get adapters "
                                  "(a name matches every layer whose path ends with it); the default is the "
                                  "attention projections, as in diffusers' SD LoRA example.")
    lora_include_convs: bool = _f(False, "Also adapt every ResNet block's conv1, conv2 and conv_shortcut (not "
                                  "conv_out, the down/up-sampling convolutions or time_emb_proj).")

    # --- EDDPM: the learned step mask (docs/eddpm-algorithm.md) ----------------------------------------
    final_keep_rate: float = _f(0.02, "gamma_f of Eq. (10): fraction of the T=1000 steps kept at the end; the "
                                "exported scheduler keeps round(final_keep_rate * 1000) steps.")
    warmup: float = _f(0.16, "Training progress (0-1) before the keep rate starts falling.")
    ramp_end: float = _f(0.6, "Training progress (0-1) where the cubic ramp reaches final_keep_rate.")
    scores_lr: float = _f(0.01, "Step size eta_s of the keep-probability update, Eq. (11). 0.01 suits adam; the "
                          "paper's sgd needs a step matched to the loss scale (0.1 on the 2-D benchmark). 0 with "
                          "--final_keep_rate 1 keeps every step: ordinary DDPM training (t uniform, unmasked alpha-bar).")
    scores_optimizer: str = _f("adam", "sgd is the paper's projected gradient step; adam normalises the "
                               "REINFORCE gradient's scale (bench/steps_vs_quality.py: sgd 0.5 committed s to "
                               "0/1 on noise, adam 0.01 did not).", choices=("sgd", "adam"))
    scores_max_grad_norm: float = _f(3.0, "Norm clip of the score gradient (the authors' related code uses 3).")
    mask_mode: str = _f("respaced", "Reading of the masked alpha-bar: paper (Eq. 6), respaced or rescaled. respaced "
                        "keeps the pretrained noise levels, so sampling from pure noise stays right.",
                        choices=("paper", "respaced", "rescaled"))
    pg_reward: str = _f("gap", "What the policy gradient minimises: loss (the paper's plain loss, Eq. 9), gap "
                        "(the error of the deterministic step to the previous kept step, eddpm/rewards.py) or step "
                        "(that step's discretisation error by step doubling: one more forward pass per row, "
                        "respaced only). With the plain loss the learned steps collapse to high noise (README, "
                        "'Does EDDPM work?').", choices=("loss", "gap", "step"))
    pg_baseline: str = _f("loo", "Policy-gradient baseline: loo (leave-one-out over the global batch) or none.",
                          choices=("loo", "none"))

    # --- logging, validation, checkpoints -------------------------------------------------------------
    report_to: str = _f("tensorboard", "accelerate tracker (tensorboard, wandb, all) or none.")
    logging_steps: int = _f(10, "Optimizer steps between lines of stats.jsonl and tracker logs.")
    validation_steps: int = _f(0, "Optimizer steps between validation relights; 0 validates only at the end.")
    num_validation_images: int = _f(4, "Validation relights per validation, from the first dataset rows.")
    validation_guidance_scale: float = _f(2.0, "CFG of validation relights (IC-Light's default 2).")
    checkpointing_steps: int = _f(500, "Optimizer steps between checkpoints (0: none).")
    export_fp32: bool = _f(False, "Export unet/ in float32 (3.4 GB for SD1.5) instead of float16 (1.7 GB). "
                           "Checkpoints always keep the float32 master weights.")
    export_searched_schedule: int = _f(0, "If K > 0, also search K steps for the final model without training "
                                       "(eddpm/schedule_search.py: teacher trajectories, cost matrix, dynamic "
                                       "programming) and write them to scheduler_searched/, for DPM-Solver++ 2M "
                                       "(sampler eddpm_dpmpp_2m); scheduler/ stays the learned steps.")
    search_trajectories: int = _f(100, "Teacher trajectories of --export_searched_schedule: the first this many "
                                  "dataset rows of the first row's size, each a DDIM run of 250 guided steps.")
    checkpoints_total_limit: typing.Optional[int] = _f(3, "Keep at most this many checkpoint-<step> folders.")
    resume_from_checkpoint: typing.Optional[str] = _f(None, "A checkpoint folder, or 'latest' in output_dir.")
    max_nonfinite_steps: int = _f(5, "Consecutive non-finite losses that stop the run (after a checkpoint).")
    alpha_bar_warning: float = _f(0.1, "Warn when the mean masked alpha-bar_T(m) over a logging window exceeds "
                                  "this (the unmasked SD1.5 value is 0.0047: sampling starts from pure noise).")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)


PRESETS: dict[str, dict[str, typing.Any]] = {
    # The whole job on a 2-core CPU in under 3 minutes, no downloads: bundled synthetic data, tiny models.
    "tiny": dict(
        base_model="tiny", data_dir="data/synthetic", output_dir="outputs/tiny", resolution=64, num_threads=1,
        train_batch_size=8, max_train_steps=240, learning_rate=3e-4, lr_warmup_steps=20,
        checkpointing_steps=120, validation_steps=0, num_validation_images=4, logging_steps=10,
        report_to="tensorboard",
    ),
    # A model that visibly relights, on a CPU in about 10 minutes (issue 7; bench/relight_accuracy.py measures
    # it): the same tiny models, 100 synthetic scenes each under all five lights (rendered into data_dir on
    # the first run), flips that swap left/right, and v-prediction, since a UNet trained from scratch with
    # eps-prediction barely learns the noisiest steps that set the light (README, "A tiny model that relights").
    "small": dict(
        base_model="tiny", data_dir="data/synthetic-small", synthetic_scenes=100, output_dir="outputs/small",
        resolution=64, num_threads=1, flip=True, prediction_type="v_prediction", train_batch_size=16,
        max_train_steps=3000, learning_rate=2e-3, lr_warmup_steps=50, checkpointing_steps=500,
        validation_steps=500, logging_steps=20,
    ),
    # The real run: IC-Light fc on SD1.5 with the weights from `python download_models.py`, one or more GPUs.
    # Memory (bench/memory.py, README "Memory"): micro-batches of 1 accumulated to the effective batch of 16,
    # gradient checkpointing, 8-bit AdamW and the EMA in CPU memory: a step at 512x640 is estimated at 11.1 GB
    # of GPU memory (19.5 GB with fp32 AdamW and the EMA on the GPU), and the same settings train within
    # 15.0 GB of RAM on a 24 GB machine without a GPU (tests/test_rehearsal.py).
    "iclight": dict(
        base_model="models/realistic-vision-v51", offset_path="models/iclight_sd15_fc.safetensors",
        rmbg_path="models/RMBG-1.4", data_dir="data/train", output_dir="outputs/iclight", resolution=512,
        train_batch_size=1, gradient_accumulation_steps=16, num_train_epochs=1, learning_rate=1e-5,
        lr_warmup_steps=100, mixed_precision="bf16", gradient_checkpointing=True, use_8bit_adam=True,
        offload_ema=True, final_keep_rate=0.025, checkpointing_steps=500, validation_steps=500, logging_steps=10,
        ema_decay=0.9999,
    ),
}

# The real run as LoRA for 8-12 GB cards (README, "LoRA"; bench/memory.py): the iclight preset (micro-batches
# of 1 accumulated to 16, gradient checkpointing, bf16) with rank-16 adapters on the attention projections plus
# conv_in and diffusers' LoRA learning rate. The adapters' AdamW state and EMA are a few tens of MB, so neither
# 8-bit AdamW (bitsandbytes) nor an EMA in CPU memory is worth its cost here.
PRESETS["iclight_lora"] = {
    **PRESETS["iclight"], "output_dir": "outputs/iclight_lora", "lora_rank": 16, "learning_rate": 1e-4,
    "use_8bit_adam": False, "offload_ema": False,
}


def _arg_type(annotation):
    inner = [a for a in typing.get_args(annotation) if a is not type(None)]
    base = inner[0] if inner else annotation
    return {"int": int, "float": float, "str": str, "bool": bool}.get(getattr(base, "__name__", str(base)), str)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train the IC-Light fc UNet with EDDPM (learned diffusion-step masks).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        kind = _arg_type(hints[f.name])
        kwargs = dict(default=None, help=f.metadata["help"])
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = kind
            if "choices" in f.metadata:
                kwargs["choices"] = f.metadata["choices"]
        parser.add_argument(f"--{f.name}", **kwargs)
    return parser


def resolve_config(argv: typing.Sequence[str] | None = None) -> TrainConfig:
    """Defaults, then the preset, then the flags that were given; validated."""
    given = {k: v for k, v in vars(build_parser().parse_args(argv)).items() if v is not None}
    preset = given.get("preset", TrainConfig.preset)
    values = {**PRESETS[preset], **given, "preset": preset}
    if "num_train_epochs" in given and "max_train_steps" not in given:
        values["max_train_steps"] = None  # an explicit epoch count wins over the preset's step count
    defaults = TrainConfig(preset=preset)
    for name in PATH_FIELDS:
        value = values.get(name, getattr(defaults, name))
        values[name] = absolute_path(value, Path.cwd() if name in given else REPO_ROOT)
    cfg = TrainConfig(**values)
    validate(cfg)
    return cfg


def absolute_path(value: str | None, base: Path) -> str | None:
    """`value` made absolute against `base`; None, 'tiny' and hub ids ("owner/name" that is no local folder
    under `base`) are returned as they are."""
    if value is None or value == "tiny":
        return value
    path = Path(value).expanduser()
    if path.is_absolute():
        return str(path)
    candidate = base / path
    looks_like_hub_id = len(path.parts) == 2 and not value.startswith(".") and not candidate.exists()
    if looks_like_hub_id and not (base / path.parts[0]).is_dir():
        return value
    return str(candidate.resolve())


# (fields, test, what the flag must be): the simple range checks of `validate`
_RANGES = (
    (("final_keep_rate",), lambda v: 0 < v <= 1, "in (0, 1]"),
    (("caption_dropout", "lora_dropout"), lambda v: 0 <= v < 1, "in [0, 1)"),
    (("ema_decay",), lambda v: 0 <= v < 1, "in [0, 1)"),
    (("resolution",), lambda v: v >= 64 and v % 64 == 0, "a positive multiple of 64"),
    (("train_batch_size", "gradient_accumulation_steps", "num_train_epochs", "logging_steps",
      "max_nonfinite_steps"), lambda v: v >= 1, ">= 1"),
    (("max_train_steps", "checkpoints_total_limit"), lambda v: v is None or v >= 1, ">= 1"),
    (("checkpointing_steps", "validation_steps", "num_validation_images", "lr_warmup_steps",
      "dataloader_num_workers", "synthetic_scenes", "export_searched_schedule"), lambda v: v >= 0, ">= 0"),
    (("search_trajectories",), lambda v: v >= 1, ">= 1"),
    (("learning_rate", "max_grad_norm", "scores_max_grad_norm", "snr_gamma"), lambda v: v > 0, "> 0"),
    (("scores_lr",), lambda v: v >= 0, ">= 0"),
    (("lora_rank",), lambda v: v >= 0, ">= 0 (0: full fine-tuning)"),
    (("lora_alpha",), lambda v: v is None or v > 0, "> 0"),
)


def validate(cfg: TrainConfig) -> None:
    """Clear errors for settings that cannot work, before anything heavy is loaded."""
    problems = [f"--{name} must be {what}, got {getattr(cfg, name)}"
                for names, ok, what in _RANGES for name in names if not ok(getattr(cfg, name))]
    if not 0 <= cfg.warmup < cfg.ramp_end <= 1:
        problems.append(f"need 0 <= --warmup < --ramp_end <= 1, got {cfg.warmup} and {cfg.ramp_end}")
    problems += _lora_problems(cfg)
    resume = cfg.resume_from_checkpoint
    if resume not in (None, "latest") and not os.path.isdir(resume):
        problems.append(f"--resume_from_checkpoint {resume!r} is neither 'latest' nor a checkpoint folder")
    if cfg.pg_reward == "step" and cfg.mask_mode != "respaced":
        problems.append(f"--pg_reward step needs --mask_mode respaced, got {cfg.mask_mode}")
    if cfg.pg_baseline == "loo" and cfg.train_batch_size * cfg.gradient_accumulation_steps < 2:
        problems.append("--pg_baseline loo needs at least 2 rows per optimizer step on each process "
                        "(raise --train_batch_size or --gradient_accumulation_steps, or use --pg_baseline none)")
    if problems:
        raise SystemExit("train.py: invalid configuration:\n  " + "\n  ".join(problems))


def _lora_problems(cfg: TrainConfig) -> list[str]:
    if cfg.lora_rank == 0 and (cfg.lora_include_convs or cfg.lora_alpha is not None):
        return ["--lora_alpha and --lora_include_convs need --lora_rank > 0"]
    if cfg.lora_rank > 0 and not cfg.lora_target_modules.replace(",", " ").strip() and not cfg.lora_include_convs:
        return ["--lora_target_modules is empty: name at least one layer or add --lora_include_convs"]
    return []
