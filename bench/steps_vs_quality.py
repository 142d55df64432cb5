"""Sample quality against the number of steps: EDDPM's learned steps next to the usual samplers.

Small diffusion models trained on the CPU by the project's own training step, T = 1000 with SD1.5's betas,
on two data sets with held-out samples:
    gmm     8 Gaussians on a ring with UNEQUAL weights (0.30 .. 0.03), so that a sampler which snaps noise
            to the nearest mode shows up as an error in the mode proportions
    digits  scikit-learn's 8x8 digits scaled to [-1, 1]; a 500-image stratified held-out split

What is trained: every model runs `eddpm.training.train_step`, the step of train.py, on an MLP denoiser put
in the UNet's call signature (`DenoiserAsUNet`: a sample [D] is a latent [D, 1, 1] next to a condition of 0
channels, with no prompt). So each step draws one mask and one t PER SAMPLE from the policy (as train.py;
the bench no longer shares one mask among a group of samples, and `masks_per_step` is gone), takes the
plain eps loss, clips the gradient norm at `max_grad_norm`, steps Adam, updates s on the whole batch and
steps diffusers' EMAModel with train.py's warm-up. `base` trains with `eddpm.policy.UniformTimesteps`
(ordinary DDPM training: t uniform over all T steps, no mask). Every EDDPM model trains with
`eddpm.policy.MaskPolicy` at train.py's defaults except for the mask reading and the reward: paper,
respaced and rescaled with the paper's plain-loss reward, and respaced-gap = respaced with the gap reward
of eddpm/rewards.py (train.py's default pair); respaced-step (respaced with the step-doubling reward, one
more model call per sample) runs only when asked for with --modes. `--selection` swaps the held-out data and
the training seeds for a selection set, to choose settings on. For every reading and every K, `ft-<mode>` fine-tunes
`base` for `finetune_fraction` of its steps (the IC-Light case); `scratch-<mode>` trains from scratch for
as many steps as `base`, at the K of `scratch_ks` only (K = 10 by default: these runs cost 4x a fine-tune
each).

Methods, named model/sampler/steps:
    reference/ddpm-1000                DDPM over all 1000 steps on `base`
    base/{ddpm,ddim,dpmpp}/uniform     diffusers' DDPM respaced, DDIM, DPM-Solver++ (2M), K "trailing" steps
    <model>/eddpm/learned              EDDPMScheduler with the learned scores and K kept steps (its reading)
    <model>/eddpm/uniform              control: the same EDDPM model and scheduler with K uniform steps
    <model>/dpmpp/{learned,uniform}    respaced readings only: DPM-Solver++ over the kept steps (custom
                                       timesteps) and over K uniform steps, on the same EDDPM model
    <model>/ddim/learned               respaced readings only: DDIM over the kept steps
    base/dpmpp/learned-by-ft-<mode>    respaced readings only: the fine-tune's kept steps on `base`
    base/dpmpp/ays                     DPM-Solver++ (2M) on Align Your Steps' SD1.5 steps, log-linearly
                                       interpolated to K (eddpm/schedule_search.py ays_timesteps)
    {base,<model>}/dpmpp/searched      DPM-Solver++ (2M) on steps searched for that frozen model
                                       (eddpm/schedule_search.py: `search_trajectories` DDIM teacher runs of
                                       250 steps, 51 grid points, dynamic programming); respaced readings only
                                       for the EDDPM models. `--samplers` picks these extra rows (ays,searched).
Metrics: gmm: sliced Wasserstein-1 (swd), MMD^2 with RBF kernels (mmd), total-variation error of the mode
proportions (mode_err), fraction of samples farther than 4 std from every mode (off_mode); digits: Frechet
distance in the features of a small classifier trained once with a fixed seed (fd), total-variation error
of its class histogram (class_err). Mean and std over training seeds; a `data` row gives each metric's
floor (held-out data against fresh or training data).

Step size of s: Adam at 0.01 (MaskPolicy's and train.py's default, scale-free across the plain loss and
the gap reward). Plain SGD at 0.5 committed s to 0/1 within a few dozen steps on noisy REINFORCE estimates
and could push sum(s) below K, so that top-K filled up with tied steps next to T-1.

    python bench/steps_vs_quality.py                       # default: about 1 h on 2 cores (estimated)
    python bench/steps_vs_quality.py --quick --output_dir /tmp/q
    python bench/steps_vs_quality.py --datasets gmm --ks 10 --seeds 1 --modes respaced-gap --inits ft
    python bench/steps_vs_quality.py --selection --modes respaced-gap,respaced-step --inits ft   # reward choice
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import multiprocessing
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler  # noqa: E402

from eddpm import masks as M  # noqa: E402
from eddpm.policy import MaskPolicy, UniformTimesteps  # noqa: E402
from eddpm.samplers import CustomTimestepsDDIMScheduler  # noqa: E402
from eddpm.schedule_search import ays_timesteps, search_schedule  # noqa: E402
from eddpm.scheduler import EDDPMScheduler  # noqa: E402
from eddpm.training import StepSettings, Trainee, step_seed, train_step  # noqa: E402

T = 1000
SD15 = dict(num_train_timesteps=T, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
# respaced-gap / respaced-step: respaced with the reward "gap" / "step" of eddpm/rewards.py
MODES = ("paper", "respaced", "rescaled", "respaced-gap", "respaced-step")
REWARDS = {"respaced-gap": "gap", "respaced-step": "step"}  # the other modes: the plain loss
INITS = ("ft", "scratch")
FIXED_SCHEDULES = ("ays", "searched")  # the --samplers rows beside the learned steps (see the docstring)
METRICS = {"gmm": ("swd", "mmd", "mode_err", "off_mode"), "digits": ("fd", "class_err")}
REFERENCE = "reference/ddpm-1000"
GMM_WEIGHTS = (0.30, 0.03, 0.15, 0.05, 0.20, 0.07, 0.10, 0.10)  # by angle; big next to small on purpose
GMM_RADIUS, GMM_STD = 1.5, 0.1


@dataclass
class BenchConfig:
    # Data sets to run, from "gmm" and "digits".
    datasets: list[str] = field(default_factory=lambda: ["gmm", "digits"])
    # Numbers of sampling steps K; every EDDPM run trains for one K (final keep rate K / T).
    ks: list[int] = field(default_factory=lambda: [5, 10, 20])
    # Training seeds 0 .. seeds-1; each retrains every model. Sampling noise is shared by all methods of a seed.
    seeds: int = 3
    # A selection run: other held-out data (gmm: fresh points; digits: another split) and training seeds
    # 100, 101, ..., for choosing settings without looking at the reported set.
    selection: bool = False
    # Mask readings to train with EDDPM (see MODES).
    modes: list[str] = field(default_factory=lambda: list(MODES[:4]))
    # "ft": fine-tune the ordinary model with EDDPM (IC-Light's case); "scratch": EDDPM from initialisation.
    inits: list[str] = field(default_factory=lambda: list(INITS))
    # The K values of the from-scratch runs (each as long as the ordinary model's training, so 4x a
    # fine-tune): by default only the goal's K = 10, which bounds the default run.
    scratch_ks: list[int] = field(default_factory=lambda: [10])
    # Optimizer steps of the ordinary model and of each from-scratch EDDPM run, per data set.
    max_train_steps: dict[str, int] = field(default_factory=lambda: {"gmm": 2000, "digits": 2000})
    # EDDPM fine-tuning runs for this fraction of max_train_steps.
    finetune_fraction: float = 0.25
    # Samples per optimizer step, each with its own mask and t (as train.py): the policy's REINFORCE step
    # (leave-one-out baseline) averages over all of them.
    train_batch_size: int = 256
    # Adam learning rate of the denoisers (constant), and train.py's gradient-norm clip.
    learning_rate: float = 1e-3
    max_grad_norm: float = 1.0
    # What is sampled is diffusers' EMAModel of the weights, with train.py's warm-up (1 - (1 + step)^-3/4),
    # capped at ema_decay (train.py's 0.999 would average over more steps than a fine-tune lasts).
    ema_decay: float = 0.995
    # Step size and optimizer of the keep probabilities s (MaskPolicy's defaults; gradient norm clipped at 3).
    scores_lr: float = 0.01
    scores_optimizer: str = "adam"
    # Keep-rate schedule, Eq. (10): gamma = 1 until `warmup`, cubic ramp to K / T at `ramp_end`, then held
    # (fractions of each EDDPM run).
    warmup: float = 0.1
    ramp_end: float = 0.6
    # Hidden width and residual blocks of the MLP denoisers.
    width: dict[str, int] = field(default_factory=lambda: {"gmm": 128, "digits": 256})
    depth: dict[str, int] = field(default_factory=lambda: {"gmm": 3, "digits": 3})
    # Generated samples per method and seed (held-out set: gmm 4000 fresh points, digits 500 images).
    num_samples: dict[str, int] = field(default_factory=lambda: {"gmm": 4000, "digits": 1000})
    # Fixed step schedules of the frozen models added as rows (FIXED_SCHEDULES), and the teacher
    # trajectories of each search (one search per model serves every K).
    samplers: list[str] = field(default_factory=lambda: list(FIXED_SCHEDULES))
    search_trajectories: int = 256
    # Worker processes (one (data set, seed) unit each) and torch threads per worker.
    workers: int = 2
    threads: int = 1
    output_dir: str = "bench/results/steps_vs_quality"


PRESETS = {
    "default": {},
    "quick": dict(seeds=2, max_train_steps={"gmm": 120, "digits": 120}, train_batch_size=128,
                  num_samples={"gmm": 400, "digits": 300},
                  width={"gmm": 64, "digits": 128}, depth={"gmm": 2, "digits": 2}),
}


# ----------------------------------------------------------------------------------------------- data


def gmm_sample(num: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """num points [num, 2] of the unequal ring mixture, and their mode labels [num]."""
    labels = torch.multinomial(torch.tensor(GMM_WEIGHTS), num, replacement=True, generator=generator)
    return gmm_centers()[labels] + GMM_STD * torch.randn(num, 2, generator=generator), labels


def gmm_centers() -> torch.Tensor:
    angles = 2 * math.pi * torch.arange(len(GMM_WEIGHTS)) / len(GMM_WEIGHTS)
    return GMM_RADIUS * torch.stack([angles.cos(), angles.sin()], dim=1)  # [8, 2]


def load_data(name: str, selection: bool = False) -> dict:
    """Training and held-out sets of one data set (fixed, independent of the training seed); `selection`
    gives the selection run's held-out set instead (gmm) or another split (digits)."""
    if name == "gmm":
        train, _ = gmm_sample(20000, torch.Generator().manual_seed(0))
        heldout, labels = gmm_sample(4000, torch.Generator().manual_seed(3 if selection else 1))
        fresh, _ = gmm_sample(4000, torch.Generator().manual_seed(4 if selection else 2))  # for the metric floor
        return {"train": train, "heldout": heldout, "heldout_labels": labels, "floor": fresh}
    if name == "digits":
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        x, y = load_digits(return_X_y=True)
        x = x.astype(np.float32) / 8.0 - 1.0  # pixel values 0..16 -> [-1, 1]
        x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=500, stratify=y,
                                                  random_state=1 if selection else 0)
        return {"train": torch.from_numpy(x_tr), "train_labels": torch.from_numpy(y_tr),
                "heldout": torch.from_numpy(x_te), "heldout_labels": torch.from_numpy(y_te),
                "floor": torch.from_numpy(x_tr[:500])}
    raise ValueError(f"unknown data set {name!r}")


class Classifier(nn.Module):
    """The digits feature network: 64 -> 128 -> 64 (features, before the ReLU, so no dead dimension) -> 10."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64))
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x):
        return self.head(self.features(x))


def train_classifier(data: dict) -> tuple[dict, float]:
    """Trained once with seed 0 on the training split; returns its state dict and held-out accuracy."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = Classifier()
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, weight_decay=1e-4)
    x, y = data["train"], data["train_labels"]
    for _ in range(1500):
        idx = torch.randint(len(x), (128,), generator=gen)
        loss = nn.functional.cross_entropy(net(x[idx] + 0.05 * torch.randn(128, 64, generator=gen)), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        accuracy = float((net(data["heldout"]).argmax(1) == data["heldout_labels"]).float().mean())
    return net.state_dict(), accuracy


# --------------------------------------------------------------------------------------------- metrics


def sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, generator: torch.Generator, num_dirs: int = 256) -> float:
    """Sliced W1: the mean over random unit directions of W1 between the 1-D projections (equal sizes)."""
    n = min(len(x), len(y))
    dirs = torch.randn(x.shape[1], num_dirs, generator=generator, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    px = (x[:n].double() @ dirs).sort(0).values  # [n, num_dirs]
    py = (y[:n].double() @ dirs).sort(0).values
    return float((px - py).abs().mean())


def mmd2(x: torch.Tensor, y: torch.Tensor, bandwidths=(0.1, 0.3, 1.0)) -> float:
    """Biased MMD^2 with a sum of RBF kernels exp(-|a - b|^2 / (2 h^2))."""
    x, y = x.double(), y.double()

    def kernel(a, b):
        d2 = torch.cdist(a, b).pow(2)
        return sum(torch.exp(-d2 / (2 * h * h)) for h in bandwidths)

    return float(kernel(x, x).mean() + kernel(y, y).mean() - 2 * kernel(x, y).mean())


def histogram_error(labels: torch.Tensor, target: torch.Tensor, num_classes: int) -> tuple[float, list[float]]:
    """Total variation 0.5 sum_k |p_k - q_k| between the label histogram and `target` probabilities."""
    hist = torch.bincount(labels, minlength=num_classes).double() / len(labels)
    return float(0.5 * (hist - target.double()).abs().sum()), hist.tolist()


def frechet_distance(f: np.ndarray, g: np.ndarray) -> float:
    """|mu_f - mu_g|^2 + tr(C_f + C_g - 2 (C_f C_g)^(1/2)) of two feature sets [N, D]."""
    from scipy import linalg

    mu_f, mu_g = f.mean(0), g.mean(0)
    c_f, c_g = np.cov(f, rowvar=False), np.cov(g, rowvar=False)
    root = linalg.sqrtm(c_f @ c_g).real
    return float(((mu_f - mu_g) ** 2).sum() + np.trace(c_f + c_g - 2 * root))


class Evaluator:
    """Metrics of generated samples against the held-out set of one data set."""

    def __init__(self, name: str, data: dict, classifier_state: dict | None):
        self.name, self.data = name, data
        if name == "gmm":
            self.target = torch.tensor(GMM_WEIGHTS)
        else:
            self.classifier = Classifier()
            self.classifier.load_state_dict(classifier_state)
            self.classifier.eval()
            self.target = torch.bincount(data["heldout_labels"], minlength=10).double() / len(data["heldout"])
            self.heldout_features = self.features(data["heldout"])

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> np.ndarray:
        return self.classifier.features(x).double().numpy()

    @torch.no_grad()
    def __call__(self, samples: torch.Tensor) -> dict:
        samples = samples.float()
        if not bool(torch.isfinite(samples).all()):
            return {m: float("nan") for m in METRICS[self.name]}
        heldout = self.data["heldout"]
        if self.name == "gmm":
            nearest = torch.cdist(samples, gmm_centers()).min(1)
            err, hist = histogram_error(nearest.indices, self.target, len(GMM_WEIGHTS))
            return {"swd": sliced_wasserstein(samples, heldout, torch.Generator().manual_seed(0)),
                    "mmd": mmd2(samples[:2000], heldout[:2000]), "mode_err": err, "mode_hist": hist,
                    "off_mode": float((nearest.values > 4 * GMM_STD).double().mean())}
        samples = samples.clamp(-1.0, 1.0)  # decoding to pixel range, the same for every method
        err, hist = histogram_error(self.classifier(samples).argmax(1), self.target, 10)
        return {"fd": frechet_distance(self.features(samples), self.heldout_features),
                "class_err": err, "class_hist": hist}


# ---------------------------------------------------------------------------------------------- models


class Denoiser(nn.Module):
    """eps_theta(x_t, t): an MLP with residual blocks; a sinusoidal embedding of t is added in every block."""

    def __init__(self, dim: int, width: int, depth: int, num_freqs: int = 32):
        super().__init__()
        freqs = torch.exp(-math.log(10000.0) * torch.arange(num_freqs) / num_freqs)
        self.register_buffer("freqs", freqs)
        self.time_mlp = nn.Sequential(nn.Linear(2 * num_freqs, width), nn.SiLU(), nn.Linear(width, width))
        self.inp = nn.Linear(dim, width)
        self.blocks = nn.ModuleList(nn.Sequential(nn.SiLU(), nn.Linear(width, width)) for _ in range(depth))
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(width, dim))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        angles = t.float().unsqueeze(1) * self.freqs  # [B, F]
        emb = self.time_mlp(torch.cat([angles.sin(), angles.cos()], dim=1))  # [B, W]
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h + emb)
        return self.out(h)


def base_betas() -> torch.Tensor:
    return DDPMScheduler(**SD15).betas.double()  # [T], SD1.5's scaled-linear schedule


class DenoiserAsUNet(nn.Module):
    """A Denoiser in the UNet's call signature that `train_step` uses: model_input [B, D + 0, 1, 1] (the noisy
    sample as a latent [D, 1, 1], then a condition of 0 channels), timesteps [B]; returns `.sample` [B, D, 1, 1].
    The prompt embedding is ignored. It holds no parameter of its own, so its EMA is the Denoiser's."""

    def __init__(self, denoiser: nn.Module):
        super().__init__()
        self.denoiser = denoiser

    def forward(self, model_input: torch.Tensor, timesteps: torch.Tensor, encoder_hidden_states=None):
        eps = self.denoiser(model_input.flatten(1), timesteps)  # [B, D]
        return SimpleNamespace(sample=eps[:, :, None, None])


def as_micro_batch(x0: torch.Tensor) -> dict[str, torch.Tensor]:
    """Data [B, D] as train_step's micro-batch: latents [B, D, 1, 1], no condition, a dummy prompt."""
    B = x0.shape[0]
    return {"latents": x0[:, :, None, None], "cond_latents": x0.new_zeros(B, 0, 1, 1),
            "prompt_embeds": x0.new_zeros(B, 1, 1)}


def train(model: nn.Module, data: torch.Tensor, cfg: BenchConfig, steps: int, seed: int,
          policy: MaskPolicy | UniformTimesteps, num_kept: int | None = None) -> nn.Module:
    """`steps` steps of `eddpm.training.train_step` on `model` (in place); returns a copy with the EMA weights.

    policy: UniformTimesteps (ordinary DDPM) or a MaskPolicy, whose s the steps update toward
    sum(s) <= keep_rate * T with train.py's schedule (Eq. 10) from 1 down to num_kept / T.
    """
    from accelerate import Accelerator
    from diffusers.training_utils import EMAModel

    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate, foreach=True)
    ema = EMAModel(model.parameters(), decay=cfg.ema_decay, use_ema_warmup=True, power=3 / 4, foreach=True)
    trainee = Trainee(Accelerator(cpu=True), DenoiserAsUNet(model).train(), optimizer,
                      torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0), policy, ema,
                      empty_prompt_embeds=torch.zeros(1, 1))
    settings = StepSettings(caption_dropout=0.0, max_grad_norm=cfg.max_grad_norm)  # no prompts to drop
    final_keep_rate = (num_kept or T) / T
    data_generator, step_generator = torch.Generator().manual_seed(seed), torch.Generator()
    for step in range(steps):
        x0 = data[torch.randint(len(data), (cfg.train_batch_size,), generator=data_generator)]  # [B, D]
        step_generator.manual_seed(step_seed(seed, 0, step))  # as train.py: re-seeded at every step
        keep = M.keep_rate(min((step + 1) / steps, 1.0), final_keep_rate, cfg.warmup, cfg.ramp_end)
        train_step(trainee, [as_micro_batch(x0)], step_generator, keep, settings)
    ema_model = copy.deepcopy(model).requires_grad_(False)
    ema.copy_to(ema_model.parameters())
    return ema_model.eval()


def new_model(name: str, cfg: BenchConfig, seed: int) -> nn.Module:
    """A freshly initialised denoiser (seeded)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return Denoiser(2 if name == "gmm" else 64, cfg.width[name], cfg.depth[name])


# -------------------------------------------------------------------------------------------- sampling


def scheduler_for(kind: str, **extra):
    """A diffusers scheduler on SD1.5's betas, no clipping, uniform steps spaced "trailing" (start at T-1)."""
    if kind == "ddpm":
        return DDPMScheduler(**SD15, clip_sample=False, timestep_spacing="trailing")
    if kind == "ddim":  # DDIMScheduler, which also takes custom timesteps (the learned steps)
        return CustomTimestepsDDIMScheduler(**SD15, clip_sample=False, set_alpha_to_one=True,
                                            timestep_spacing="trailing")
    if kind == "dpmpp":
        return DPMSolverMultistepScheduler(**SD15, algorithm_type="dpmsolver++", solver_order=2,
                                           timestep_spacing="trailing")
    if kind == "eddpm":
        return EDDPMScheduler(**SD15, clip_sample=False, **extra)
    raise ValueError(kind)


def uniform_timesteps(num_steps: int) -> list[int]:
    scheduler = scheduler_for("ddpm")
    scheduler.set_timesteps(num_steps)
    return scheduler.timesteps.tolist()


@torch.no_grad()
def sample(model: nn.Module, scheduler, num: int, dim: int, seed: int, num_steps: int | None = None,
           timesteps: list[int] | None = None) -> tuple[torch.Tensor, int, float]:
    """The generic diffusers loop: set_timesteps, scale_model_input, eps, step. Returns (x_0 [num, dim], NFE, s)."""
    gen = torch.Generator().manual_seed(seed)
    if timesteps is not None:
        scheduler.set_timesteps(timesteps=timesteps)
    else:
        scheduler.set_timesteps(num_steps)
    x = torch.randn(num, dim, generator=gen) * scheduler.init_noise_sigma  # [N, D]
    nfe, start = 0, time.perf_counter()
    for t in scheduler.timesteps:
        eps = model(scheduler.scale_model_input(x, t), t.expand(num))
        nfe += 1
        x = scheduler.step(eps, t, x, generator=gen).prev_sample
    return x, nfe, time.perf_counter() - start


def search_on(model: nn.Module, cfg: BenchConfig, dim: int, seed: int, ks: list[int]) -> dict:
    """Searched schedules for the frozen `model` at each K (eddpm/schedule_search.py), from
    cfg.search_trajectories teacher trajectories whose noise is not the evaluation's."""
    def eps_fn(x: torch.Tensor, t: int) -> torch.Tensor:
        return model(x, torch.full((x.shape[0],), t, dtype=torch.long))

    noise = torch.randn(cfg.search_trajectories, dim, generator=torch.Generator().manual_seed(20_000 + seed))
    with torch.no_grad():
        return search_schedule(eps_fn, noise, ks, torch.cumprod(1 - base_betas(), 0))


def record_fixed_schedules(label: str, model: nn.Module, cfg: BenchConfig, dim: int, seed: int, record,
                           timings: dict) -> None:
    """The --samplers rows of one frozen model: AYS and the searched steps with DPM-Solver++ at every K."""
    if "ays" in cfg.samplers:
        for k in cfg.ks:
            record(f"{label}/dpmpp/ays", k, model, scheduler_for("dpmpp"),
                   timesteps=ays_timesteps(k, torch.cumprod(1 - base_betas(), 0)))
    if "searched" in cfg.samplers:
        found = search_on(model, cfg, dim, seed, list(cfg.ks))
        first = next(iter(found.values()))
        timings[f"search-{label}"] = first.teacher_seconds + first.cost_seconds
        for k in cfg.ks:
            record(f"{label}/dpmpp/searched", k, model, scheduler_for("dpmpp"), timesteps=found[k].timesteps)


# ------------------------------------------------------------------------------------------- one unit


def run_unit(name: str, seed: int, cfg: BenchConfig, data: dict, classifier_state: dict | None) -> dict:
    """Every model and method of one (data set, training seed): rows of metrics and the learned masks."""
    torch.set_num_threads(cfg.threads)
    evaluate = Evaluator(name, data, classifier_state)
    dim, num = data["train"].shape[1], cfg.num_samples[name]
    sample_seed = 10_000 + seed  # the same starting noise for every method of this seed
    rows, masks, timings = [], [], {}

    def record(method, k, model, scheduler, **kw):
        x, nfe, wall = sample(model, scheduler, num, dim, sample_seed, **kw)
        rows.append({"dataset": name, "seed": seed, "method": method, "K": k, "nfe": nfe,
                     "wall_ms": 1e3 * wall, **evaluate(x)})

    steps = cfg.max_train_steps[name]
    start = time.perf_counter()
    base_model = train(new_model(name, cfg, seed), data["train"], cfg, steps, seed, UniformTimesteps(base_betas()))
    timings["base"] = time.perf_counter() - start
    record(REFERENCE, T, base_model, scheduler_for("ddpm"), num_steps=T)
    for k in cfg.ks:
        for kind in ("ddpm", "ddim", "dpmpp"):
            record(f"base/{kind}/uniform", k, base_model, scheduler_for(kind), num_steps=k)
    record_fixed_schedules("base", base_model, cfg, dim, seed, record, timings)

    for init in cfg.inits:
        for mode in cfg.modes:
            mask_mode = "respaced" if mode in REWARDS else mode
            for k in cfg.ks if init == "ft" else [k for k in cfg.ks if k in cfg.scratch_ks]:
                start = time.perf_counter()
                run_seed = 1000 * seed + 100 * INITS.index(init) + 10 * MODES.index(mode) + k
                if init == "ft":  # from the base model's EMA weights
                    model = copy.deepcopy(base_model).requires_grad_(True)
                else:
                    model = new_model(name, cfg, run_seed)
                policy = MaskPolicy(base_betas(), mask_mode=mask_mode, lr=cfg.scores_lr,
                                    optimizer=cfg.scores_optimizer,
                                    reward=REWARDS.get(mode, "loss"))
                run_steps = max(1, round(steps * cfg.finetune_fraction)) if init == "ft" else steps
                eddpm_model = train(model, data["train"], cfg, run_steps, run_seed, policy, num_kept=k)
                timings[f"{init}-{mode}-K{k}"] = time.perf_counter() - start
                label = f"{init}-{mode}"
                scores = policy.scores.detach().clone()
                learned = scheduler_for("eddpm", scores=scores.tolist(), num_kept_steps=k, mask_mode=mask_mode)
                uniform_mask = M.mask_from_timesteps(torch.tensor(uniform_timesteps(k)), T)
                uniform = scheduler_for("eddpm", scores=uniform_mask.tolist(), num_kept_steps=k,
                                        mask_mode=mask_mode)
                kept = learned.kept_timesteps.tolist()
                masks.append({"dataset": name, "seed": seed, "model": label, "K": k, "kept_timesteps": kept,
                              "terminal_alpha_bar": learned.terminal_alpha_bar,
                              "uniform_terminal_alpha_bar": uniform.terminal_alpha_bar,
                              "sum_scores": float(scores.sum()),
                              "undecided": int(((scores > 0.01) & (scores < 0.99)).sum()),
                              "distance_to_binary": float(torch.minimum(scores, 1 - scores).sum())})
                record(f"{label}/eddpm/learned", k, eddpm_model, learned, num_steps=k)
                record(f"{label}/eddpm/uniform", k, eddpm_model, uniform, num_steps=k)
                if mask_mode == "respaced":
                    record(f"{label}/dpmpp/learned", k, eddpm_model, scheduler_for("dpmpp"), timesteps=kept)
                    record(f"{label}/ddim/learned", k, eddpm_model, scheduler_for("ddim"), timesteps=kept)
                    record(f"{label}/dpmpp/uniform", k, eddpm_model, scheduler_for("dpmpp"), num_steps=k)
                    if init == "ft":
                        record(f"base/dpmpp/learned-by-{label}", k, base_model, scheduler_for("dpmpp"),
                               timesteps=kept)
                    if "searched" in cfg.samplers:
                        found = search_on(eddpm_model, cfg, dim, seed, [k])
                        timings[f"search-{label}-K{k}"] = found[k].teacher_seconds + found[k].cost_seconds
                        record(f"{label}/dpmpp/searched", k, eddpm_model, scheduler_for("dpmpp"),
                               timesteps=found[k].timesteps)
    print(f"[{name} seed {seed}] done: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()), flush=True)
    return {"rows": rows, "masks": masks, "train_seconds": timings}


# ------------------------------------------------------------------------------------------- report


def method_order(methods: set[str]) -> list[str]:
    def key(method):
        model, sampler, *steps = method.split("/")
        group = 0 if model == "reference" else 1 if model == "base" else 2
        init, _, mode = model.partition("-")
        return (group, INITS.index(init) if init in INITS else -1, MODES.index(mode) if mode in MODES else -1,
                sampler, steps)
    return sorted(methods, key=key)


def aggregate(rows: list[dict], name: str) -> dict:
    """{method: {K: {metric: {mean, std, values}, nfe, wall_ms}}} over training seeds."""
    out: dict = {}
    for row in rows:
        if row["dataset"] == name:
            out.setdefault(row["method"], {}).setdefault(str(row["K"]), []).append(row)
    result = {}
    for method in method_order(set(out)):
        result[method] = {}
        for k, group in sorted(out[method].items(), key=lambda kv: int(kv[0])):
            entry = {}
            for metric in METRICS[name]:
                values = [r[metric] for r in group]
                entry[metric] = {"mean": float(np.mean(values)), "std": float(np.std(values)), "values": values}
            entry["nfe"] = group[0]["nfe"]
            entry["wall_ms"] = float(np.median([r["wall_ms"] for r in group]))
            # the histogram of modes / classes of the generated samples, averaged over seeds
            hist_key = "mode_hist" if name == "gmm" else "class_hist"
            entry["hist"] = np.mean([r[hist_key] for r in group], axis=0).round(4).tolist()
            result[method][k] = entry
    return result


def fmt(entry: dict | None, metric: str) -> str:
    if entry is None:
        return "-"
    mean, std = entry[metric]["mean"], entry[metric]["std"]
    digits = 4 if metric == "mmd" else 3
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def report_markdown(payload: dict) -> str:
    ks = [str(k) for k in payload["config"]["ks"]]
    lines = ["# Steps vs quality\n", f"Command: `{payload['command']}`\n",
             f"Machine: {payload['machine']['cpu']}, {payload['machine']['cores']} cores, "
             f"{payload['config']['workers']} workers x {payload['config']['threads']} torch threads, "
             f"torch {payload['machine']['torch']}, diffusers {payload['machine']['diffusers']}; "
             f"total wall time {payload['wall_time_s'] / 60:.1f} min.\n",
             f"Mean ± std over {payload['config']['seeds']} training seeds; lower is better everywhere. "
             "T = 1000, SD1.5 betas. `data` is the metric between held-out data and other real data "
             "(its floor); the reference row repeats DDPM-1000 in every column.\n"]
    for name, result in payload["results"].items():
        floor = payload["floor"][name]
        info = payload["dataset_info"][name]
        lines.append(f"## {name}\n")
        lines.append(", ".join(f"{k}: {v}" for k, v in info.items()) + "\n")
        for metric in METRICS[name]:
            lines.append(f"### {metric}\n")
            lines.append("| method | " + " | ".join(f"K={k}" for k in ks) + " |")
            lines.append("|---|" + "---|" * len(ks))
            lines.append("| data | " + " | ".join(f"{floor[metric]:.4f}" for _ in ks) + " |")
            ref = result.get(REFERENCE, {}).get(str(T))
            lines.append(f"| {REFERENCE} | " + " | ".join(fmt(ref, metric) for _ in ks) + " |")
            for method, by_k in result.items():
                if method != REFERENCE:
                    lines.append(f"| {method} | " + " | ".join(fmt(by_k.get(k), metric) for k in ks) + " |")
            lines.append("")
        lines.append(goal_check(name, result, ks))
        lines.append(f"### Cost per sampler (UNet evaluations; median wall ms for {info['generated']} samples)\n")
        lines.append("| method | " + " | ".join(f"K={k}" for k in ks) + " |")
        lines.append("|---|" + "---|" * len(ks))
        ref = result.get(REFERENCE, {}).get(str(T))
        if ref:
            lines.append(f"| {REFERENCE} | {ref['nfe']} NFE, {ref['wall_ms']:.0f} ms |" + " |" * (len(ks) - 1))
        for method, by_k in result.items():
            if method != REFERENCE:
                cells = [f"{by_k[k]['nfe']} NFE, {by_k[k]['wall_ms']:.0f} ms" if k in by_k else "-" for k in ks]
                lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
        lines.append("### Learned masks (seed 0): kept steps and alpha-bar_T(m)\n")
        lines.append("| model | K | kept steps | alpha-bar_T(m) (uniform mask) | undecided s | sum min(s, 1-s) |")
        lines.append("|---|---|---|---|---|---|")
        for mask in payload["masks"]:
            if mask["dataset"] == name and mask["seed"] == 0:
                lines.append(f"| {mask['model']} | {mask['K']} | {mask['kept_timesteps']} | "
                             f"{mask['terminal_alpha_bar']:.3f} ({mask['uniform_terminal_alpha_bar']:.3f}) | "
                             f"{mask['undecided']} | {mask['distance_to_binary']:.2f} |")
        lines.append("")
    lines.append("## Resolved config\n")
    lines.append("```json\n" + json.dumps(payload["config"], indent=1) + "\n```\n")
    return "\n".join(lines)


def goal_check(name: str, result: dict, ks: list[str]) -> str:
    """For each learned-step method: does it beat its uniform control and the best DPM-Solver++ schedule on the
    base model (uniform, AYS or searched steps, whichever has the lower mean) at the same K?

    Methods of one seed share the starting noise, so the per-seed comparison (paired) is also given.
    """
    lines = []
    for metric in METRICS[name][:1] + (("off_mode",) if name == "gmm" else ()):
        lines += [f"### Goal check on {metric}: learned steps against uniform steps on the same model and "
                  "the best base DPM-Solver++ schedule (uniform, AYS, searched) at the same K\n",
                  "| method | K | learned | uniform, same model | best base DPM++ schedule | beats both (means) | "
                  "seeds beating both |", "|---|---|---|---|---|---|---|"]
        for method, by_k in result.items():
            if not method.endswith("/learned") or method.startswith("base/"):
                continue
            for k in ks:
                control = result.get(method.replace("/learned", "/uniform"), {}).get(k)
                dpmpp = best_base_schedule(result, k, metric)
                if k not in by_k or control is None or dpmpp is None:
                    continue
                mine, c, d = (e[metric]["mean"] for e in (by_k[k], control, dpmpp))
                wins = sum(a < min(b, e) for a, b, e in zip(*(x[metric]["values"] for x in (by_k[k], control, dpmpp))))
                lines.append(f"| {method} | {k} | {mine:.3f} | {c:.3f} | {d:.3f} | "
                             f"{'yes' if mine < min(c, d) else 'no'} | {wins}/{len(by_k[k][metric]['values'])} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def best_base_schedule(result: dict, k: str, metric: str) -> dict | None:
    """The best (lowest mean `metric`) of DPM-Solver++ on `base` with uniform, AYS and searched steps at K."""
    entries = [result.get(f"base/dpmpp/{s}", {}).get(k) for s in ("uniform", *FIXED_SCHEDULES)]
    entries = [e for e in entries if e is not None]
    return min(entries, key=lambda e: e[metric]["mean"]) if entries else None


def plot(payload: dict, path: Path) -> None:
    """quality_vs_K.png: per data set, the main metrics against K for the base samplers and, per reading, the
    fine-tune's learned steps (solid) next to uniform steps on the same model (dashed); squares are the
    from-scratch runs. Every method is in report.md."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    colors = {"paper": "C3", "respaced": "C1", "rescaled": "C4", "respaced-gap": "C2", "respaced-step": "C8"}
    base_styles = {"base/ddpm/uniform": "0.6", "base/ddim/uniform": "C0", "base/dpmpp/uniform": "k",
                   "base/dpmpp/ays": "C5", "base/dpmpp/searched": "C6"}
    names = list(payload["results"])
    fig, axes = plt.subplots(len(names), 2, figsize=(12, 4.2 * len(names)), squeeze=False)
    for row, name in enumerate(names):
        result = payload["results"][name]
        for col, metric in enumerate((METRICS[name][0], METRICS[name][-1])):
            ax = axes[row][col]

            def draw(method, ax=ax, result=result, metric=metric, **style):
                by_k = result.get(method, {})
                if by_k:
                    x = [int(k) for k in by_k]
                    y = [by_k[k][metric]["mean"] for k in by_k]
                    err = [by_k[k][metric]["std"] for k in by_k]
                    ax.errorbar(x, y, yerr=err, capsize=2, ms=4, label=method, **style)

            if REFERENCE in result:
                ax.axhline(result[REFERENCE][str(T)][metric]["mean"], color="k", ls=":", label=REFERENCE)
            ax.axhline(payload["floor"][name][metric], color="0.8", ls="-", lw=3, label="data (floor)")
            for method, color in base_styles.items():
                draw(method, color=color, marker="o", lw=1.5)
            for mode, color in colors.items():
                sampler = "dpmpp" if mode.startswith("respaced") else "eddpm"
                draw(f"ft-{mode}/{sampler}/learned", color=color, marker="o", lw=1.5)
                draw(f"ft-{mode}/{sampler}/uniform", color=color, marker="x", ls="--", lw=0.8)
                draw(f"scratch-{mode}/{sampler}/learned", color=color, marker="s", ls="none")
            ax.set(xscale="log", yscale="log", xlabel="sampling steps K", ylabel=metric, title=f"{name}: {metric}")
            ax.set_xticks(payload["config"]["ks"], [str(k) for k in payload["config"]["ks"]])
            ax.xaxis.set_minor_formatter(NullFormatter())
        axes[row][1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- main


def parse_args(argv=None) -> tuple[BenchConfig, str, str | None]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny configuration for the tests (minutes)")
    parser.add_argument("--replot", metavar="RESULTS_JSON",
                        help="only rewrite report.md and the plot next to this results.json (no training)")
    parser.add_argument("--output_dir")
    parser.add_argument("--datasets", help="comma-separated, from gmm,digits")
    parser.add_argument("--ks", help="comma-separated numbers of sampling steps")
    parser.add_argument("--seeds", type=int, help="number of training seeds")
    parser.add_argument("--selection", action="store_true", default=None,
                        help="held-out data and training seeds (100, 101, ...) of the selection set, not the reported ones")
    parser.add_argument("--modes", help=f"comma-separated, from {','.join(MODES)}")
    parser.add_argument("--inits", help="comma-separated, from ft,scratch")
    parser.add_argument("--scratch_ks", help="comma-separated K values of the from-scratch runs")
    parser.add_argument("--max_train_steps", type=int, help="steps of the ordinary model, every data set")
    parser.add_argument("--finetune_fraction", type=float)
    parser.add_argument("--train_batch_size", type=int)
    parser.add_argument("--learning_rate", type=float)
    parser.add_argument("--max_grad_norm", type=float)
    parser.add_argument("--scores_lr", type=float, help="step size of the keep probabilities s")
    parser.add_argument("--scores_optimizer", choices=["sgd", "adam"])
    parser.add_argument("--warmup", type=float)
    parser.add_argument("--ramp_end", type=float)
    parser.add_argument("--samplers", help=f"comma-separated fixed schedules added as rows, from "
                        f"{','.join(FIXED_SCHEDULES)} (empty: none)")
    parser.add_argument("--search_trajectories", type=int, help="teacher trajectories of each schedule search")
    parser.add_argument("--workers", type=int)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args(argv)
    cfg = BenchConfig(**PRESETS["quick" if args.quick else "default"])
    lists = {"datasets": str, "ks": int, "modes": str, "inits": str, "scratch_ks": int, "samplers": str}
    for key, value in vars(args).items():
        if value is None or key in ("quick", "replot"):
            continue
        if key in lists:
            value = [lists[key](v) for v in value.split(",") if v]
        if key == "max_train_steps":
            value = {name: value for name in METRICS}
        setattr(cfg, key, value)
    for key, allowed in (("datasets", METRICS), ("modes", MODES), ("inits", INITS), ("samplers", FIXED_SCHEDULES)):
        bad = set(getattr(cfg, key)) - set(allowed)
        if bad:
            parser.error(f"--{key}: unknown {sorted(bad)}, choose from {list(allowed)}")
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv else sys.argv[1:])])
    return cfg, command, args.replot


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def main(argv=None) -> None:
    import diffusers

    cfg, command, replot = parse_args(argv)
    if replot:  # the payload keeps the command and timings of the run that made it
        payload = json.loads(Path(replot).read_text())
        write_outputs(payload, Path(replot).parent)
        return
    print(command)
    print(json.dumps(dataclasses.asdict(cfg)), flush=True)
    start = time.perf_counter()
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)

    datasets, classifier, info, floor = {}, {}, {}, {}
    for name in cfg.datasets:
        datasets[name] = load_data(name, cfg.selection)
        classifier[name] = None
        info[name] = {"train": len(datasets[name]["train"]), "heldout": len(datasets[name]["heldout"]),
                      "generated": cfg.num_samples[name], "train steps (base, scratch)": cfg.max_train_steps[name],
                      "fine-tune steps": max(1, round(cfg.max_train_steps[name] * cfg.finetune_fraction))}
        if name == "digits":
            classifier[name], accuracy = train_classifier(datasets[name])
            info[name]["classifier held-out accuracy"] = round(accuracy, 4)
        else:
            info[name]["mode weights"] = list(GMM_WEIGHTS)
        metrics = Evaluator(name, datasets[name], classifier[name])(datasets[name]["floor"])
        floor[name] = {m: metrics[m] for m in METRICS[name]}

    first_seed = 100 if cfg.selection else 0
    units = [(name, seed, cfg, datasets[name], classifier[name]) for name in cfg.datasets
             for seed in range(first_seed, first_seed + cfg.seeds)]
    if cfg.workers > 1 and len(units) > 1:
        with multiprocessing.get_context("fork").Pool(min(cfg.workers, len(units))) as pool:
            outputs = pool.starmap(run_unit, units)
    else:
        outputs = [run_unit(*unit) for unit in units]

    rows = [r for o in outputs for r in o["rows"]]
    payload = {
        "command": command,
        "machine": {"cpu": cpu_model(), "cores": len(os.sched_getaffinity(0)), "torch": torch.__version__,
                    "diffusers": diffusers.__version__, "python": platform.python_version()},
        "config": dataclasses.asdict(cfg),
        "wall_time_s": time.perf_counter() - start,
        "metrics": {name: list(METRICS[name]) for name in cfg.datasets},
        "dataset_info": info,
        "floor": floor,
        "results": {name: aggregate(rows, name) for name in cfg.datasets},
        "masks": [m for o in outputs for m in o["masks"]],
        "train_seconds": [{"dataset": u[0], "seed": u[1], **o["train_seconds"]} for u, o in zip(units, outputs)],
        "runs": rows,
    }
    (out_dir / "results.json").write_text(json.dumps(payload, indent=1) + "\n")
    write_outputs(payload, out_dir)


def write_outputs(payload: dict, out_dir: Path) -> None:
    (out_dir / "report.md").write_text(report_markdown(payload))
    plot(payload, out_dir / "quality_vs_K.png")
    print(f"wrote {out_dir}/report.md, results.json, quality_vs_K.png ({payload['wall_time_s']:.0f} s run)")


if __name__ == "__main__":
    main()
