"""Memory of training the IC-Light fc UNet at SD1.5 size, per configuration of `train.py --preset iclight`.

    python bench/memory.py                                   # every configuration, 256 and 512 px (about an hour)
    python bench/memory.py --only "preset defaults" --resolutions 256
    python bench/memory.py --estimate_only                   # exact bytes and the GPU estimate, nothing run
    python bench/memory.py --device cuda                     # on a GPU: torch.cuda.max_memory_allocated too

A configuration is a list of train.py flags given on top of `--preset iclight` and resolved by eddpm.config
exactly as train.py resolves them. For each one the table gives:

- exact bytes, from the shapes of the parameters the configuration trains (docs/real-size.md):
  weights (the float32 master copy; bf16 autocast casts on the fly), gradients (float32, one per trained
  parameter), optimizer state (torch AdamW: two float32 moments and a step per tensor; bitsandbytes' AdamW8bit:
  two uint8 states and one float32 absmax per 256-element block for tensors of at least 4096 elements, two
  float32 states below that) and EMA (one float32 copy of the trained parameters, eddpm/ema.py).
- the measured peak of a training step on this machine's CPU: a child process builds the SD1.5-size UNet with
  random weights (eddpm/sd15.py), train.py's optimizer (train.make_optimizer) and EMA (eddpm.ema.LowMemoryEMA),
  and runs ONE eddpm.training.train_step, the step train.py runs, over two micro-batches of the preset's batch
  size, after the optimizer has made its state: the second forward runs beside the optimizer state and the
  first micro-batch's gradients, as every forward after the first does under the preset's accumulation. The figure is the child's peak RSS (getrusage) minus its RSS just before the UNet is built
  (interpreter, torch, diffusers). "Transient" is that figure minus the exact bytes: activations, autocast's
  bf16 copies of the weights, the optimizer's and the clip's temporaries, allocator slack.
- the estimated GPU total at 512x640, batch 1: the exact bytes that live on the GPU (no EMA with
  --offload_ema), plus the transient at 512x640 extrapolated linearly in the pixel count from the two measured
  sizes (activations grow with the pixels; the autocast copies and temporaries do not), plus CUDA_CONTEXT_GB for
  the CUDA context and the cuBLAS/cuDNN workspaces, which torch's allocator statistics do not see. On a CPU
  every byte is RAM, so an EMA on the GPU and an offloaded one measure alike: such a configuration reuses
  another's measurement (`measured_as`). Configurations too big for a 24 GB machine are estimated only.

The VAE and text encoder (0.83 GB in float32) are not in the step: train.py encodes the dataset into the latent
cache first and then keeps them in CPU memory, moving them to the device only for validation relights (when the
gradients have been freed). Results go to bench/results/memory/memory.json and memory.md; a run of some
configurations updates their rows and keeps the others. Run one configuration at a time on a shared machine:
each child needs up to 19 GB (see --lock and the wait for free memory).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere
from eddpm.config import TrainConfig, resolve_config  # noqa: E402

GB = 1e9  # decimal gigabytes throughout (a "24 GB" card holds 24 GiB = 25.8 GB, so the figures err high)
CUDA_CONTEXT_GB = 1.0  # assumed: the CUDA context plus library workspaces, outside torch's allocator
TARGET_SIZE = (512, 640)  # IC-Light's default width x height
RESOLUTIONS = (256, 512)  # square sizes measured on the CPU
MICRO_BATCHES = 2  # the second forward runs beside the first one's gradients, as with accumulation
ADAM8_BLOCK, ADAM8_MIN_SIZE, ADAM8_QMAP = 256, 4096, 256  # bitsandbytes AdamW8bit's blockwise layout
RESULTS = REPO / "bench" / "results" / "memory"


@dataclass(frozen=True)
class Configuration:
    """One row: train.py flags on top of `--preset iclight`.

    measured_as: the configuration whose CPU measurement is this one's (the same step on a CPU, where an EMA
    on the device and an offloaded one are both RAM); measure=False: estimated from `measured_as` only,
    because a child would not fit this machine's 24 GB."""

    name: str
    flags: tuple[str, ...] = ()
    measured_as: str | None = None
    measure: bool = True
    note: str = ""

    def config(self) -> TrainConfig:
        return resolve_config(["--preset", "iclight", *self.flags])


def configurations() -> list[Configuration]:
    """The table's rows, in order."""
    return [
        Configuration("preset defaults", note="8-bit AdamW, EMA offloaded to the CPU, gradient checkpointing, bf16"),
        Configuration("EMA on the GPU", ("--no-offload_ema",), measured_as="preset defaults"),
        Configuration("no EMA", ("--no-use_ema",), measured_as="preset defaults"),
        Configuration("no gradient checkpointing", ("--no-gradient_checkpointing",)),
        Configuration("fp32 AdamW, no EMA", ("--no-use_8bit_adam", "--no-use_ema")),
        Configuration("fp32 AdamW, EMA offloaded", ("--no-use_8bit_adam",), measured_as="fp32 AdamW, no EMA",
                      measure=False, note="on a CPU about 20 GB: not run on this 24 GB machine"),
        Configuration("fp32 AdamW, EMA on the GPU (the old preset)", ("--no-use_8bit_adam", "--no-offload_ema"),
                      measured_as="fp32 AdamW, no EMA", measure=False,
                      note="on a CPU about 20 GB: not run on this 24 GB machine"),
        # LoRA (eddpm/lora.py): the iclight_lora preset is `--preset iclight` with these flags and --lora_rank 16
        Configuration("LoRA rank 16 (iclight_lora)", ("--lora_rank", "16", *LORA_FLAGS),
                      note="adapters on to_k, to_q, to_v, to_out.0; conv_in trained whole; their EMA on the GPU"),
        Configuration("LoRA rank 64", ("--lora_rank", "64", *LORA_FLAGS)),
        Configuration("LoRA rank 16, no gradient checkpointing",
                      ("--lora_rank", "16", *LORA_FLAGS, "--no-gradient_checkpointing")),
    ]


# A LoRA run trains a few million parameters: fp32 AdamW and an EMA on the GPU cost tens of MB (eddpm/config.py)
LORA_FLAGS = ("--no-use_8bit_adam", "--no-offload_ema")


# ---- exact bytes --------------------------------------------------------------------------------------


def build_unet(cfg: TrainConfig, device: str = "cpu"):
    """The UNet train.py trains under `cfg`, with random weights (on "meta": shapes only, no memory)."""
    from eddpm import sd15

    unet = sd15.build_unet(seed=cfg.seed, device=device)
    if cfg.lora_rank:  # as train.py's build: frozen UNet, adapters and conv_in trained (eddpm/lora.py)
        from eddpm.lora import LoraSettings, add_lora

        add_lora(unet, LoraSettings.from_config(cfg), seed=cfg.seed)
    return unet


def optimizer_state_bytes(numel: int, use_8bit_adam: bool) -> int:
    """Bytes of one parameter tensor's optimizer state (the qmaps AdamW8bit shares are counted once, apart)."""
    if not use_8bit_adam:
        return 2 * 4 * numel + 4  # exp_avg, exp_avg_sq, and the step as a float32 tensor (fused AdamW)
    if numel < ADAM8_MIN_SIZE:
        return 2 * 4 * numel  # small tensors keep float32 states
    return 2 * numel + 2 * 4 * math.ceil(numel / ADAM8_BLOCK)  # uint8 state1, state2 and their absmax


def static_bytes(cfg: TrainConfig, unet=None) -> dict[str, int]:
    """Exact bytes of weights, gradients, optimizer state and EMA under `cfg` (device-independent)."""
    unet = unet if unet is not None else build_unet(cfg, "meta")
    params = list(unet.parameters())
    trained = [p.numel() for p in params if p.requires_grad]
    optimizer = sum(optimizer_state_bytes(n, cfg.use_8bit_adam) for n in trained)
    if cfg.use_8bit_adam and any(n >= ADAM8_MIN_SIZE for n in trained):
        optimizer += 2 * 4 * ADAM8_QMAP  # the two quantisation maps, one object shared by every tensor
    return {
        "weights": sum(p.numel() * 4 for p in params),
        "gradients": 4 * sum(trained),
        "optimizer": optimizer,
        "ema": 4 * sum(trained) if cfg.use_ema else 0,
    }


def device_bytes(cfg: TrainConfig, static: dict[str, int]) -> int:
    """The exact bytes that live on the training device: all but an offloaded EMA."""
    return static["weights"] + static["gradients"] + static["optimizer"] + (0 if cfg.offload_ema else static["ema"])


def estimate(cfg: TrainConfig, static: dict[str, int], transients: dict[int, int] | None) -> dict:
    """The GPU total at TARGET_SIZE, batch cfg.train_batch_size: bytes on the device + transient + context.

    `transients` maps a measured square side to its transient bytes; two sides give a line in the pixel
    count, one side is used as it is (an underestimate above that size). None: no transient counted."""
    on_device = device_bytes(cfg, static)
    transient = 0.0
    pixels = TARGET_SIZE[0] * TARGET_SIZE[1]
    if transients:
        sides = sorted(transients)
        if len(sides) >= 2:
            (s0, t0), (s1, t1) = (sides[0], transients[sides[0]]), (sides[-1], transients[sides[-1]])
            slope = (t1 - t0) / (s1**2 - s0**2)
            transient = t1 + slope * (pixels - s1**2)
        else:
            transient = transients[sides[0]]
    transient *= cfg.train_batch_size  # measured at the preset's batch 1
    total = on_device + transient + CUDA_CONTEXT_GB * GB
    return {"on_device": on_device, "transient": transient, "cuda_context": CUDA_CONTEXT_GB * GB, "total": total}


# ---- one measured step (child process) ----------------------------------------------------------------


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def live_bytes(tensors) -> int:
    """Bytes of distinct storages among `tensors` (a tensor shared by several entries counts once)."""
    seen, total = set(), 0
    for t in tensors:
        key = (t.device, t.untyped_storage().data_ptr())
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def measure_step(flags: list[str], resolution: int, device: str) -> dict:
    """Build, then one train_step of MICRO_BATCHES micro-batches at `resolution` px; returns the figures."""
    import torch
    from accelerate import Accelerator
    from diffusers.optimization import get_scheduler

    import train
    from eddpm.ema import LowMemoryEMA
    from eddpm.iclight import CONDITION_CHANNELS, LATENT_CHANNELS, SD15_SCHEDULER_CONFIG
    from eddpm.policy import MaskPolicy
    from eddpm.scheduler import EDDPMScheduler
    from eddpm.training import StepSettings, Trainee, train_step

    cfg = resolve_config(["--preset", "iclight", *flags])
    if cfg.use_8bit_adam:
        import bitsandbytes  # noqa: F401  (library code belongs to the baseline)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=device == "cpu",
                              kwargs_handlers=[train.autocast_handler()])
    baseline = rss_bytes()

    unet = build_unet(cfg)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    optimizer = train.make_optimizer(cfg, unet)
    ema = LowMemoryEMA(unet.parameters(), offload=cfg.offload_ema, decay=cfg.ema_decay, use_ema_warmup=True,
                       power=3 / 4) if cfg.use_ema else None
    lr_scheduler = get_scheduler("constant", optimizer)
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    if ema is not None:
        ema.to(accelerator.device)
    betas = EDDPMScheduler.from_config(SD15_SCHEDULER_CONFIG).betas
    policy = MaskPolicy(betas, cfg.mask_mode, cfg.pg_baseline, cfg.scores_lr, cfg.scores_optimizer,
                        cfg.scores_max_grad_norm, reward=cfg.pg_reward)
    trainee = Trainee(accelerator, unet, optimizer, lr_scheduler, policy, ema,
                      empty_prompt_embeds=torch.zeros(77, 768))
    generator = torch.Generator().manual_seed(cfg.seed)
    B, side = cfg.train_batch_size, resolution // 8  # latents are 8x smaller than pixels

    def micro_batch():
        return {"latents": torch.randn(B, LATENT_CHANNELS, side, side, generator=generator),  # [B, 4, h, w]
                "cond_latents": torch.randn(B, CONDITION_CHANNELS, side, side, generator=generator),
                "prompt_embeds": torch.randn(B, 77, 768, generator=generator)}  # [B, 77, D]

    batches = [{k: v.to(accelerator.device) for k, v in micro_batch().items()} for _ in range(MICRO_BATCHES)]
    # the optimizer makes its state at its first step: make it now (on zero gradients), so that the measured
    # step is a steady-state one, whose forwards run beside the optimizer state
    for p in unet.parameters():
        p.grad = torch.zeros_like(p) if p.requires_grad else None
    start = time.perf_counter()
    optimizer.step()
    optimizer_seconds = time.perf_counter() - start
    optimizer.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    out = train_step(trainee, batches, generator, 1.0, StepSettings.from_config(cfg))
    seconds = time.perf_counter() - start
    if not out.finite:
        raise RuntimeError("the step's loss was not finite: nothing was measured")
    model = accelerator.unwrap_model(unet)
    state = [v for s in optimizer.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    result = {
        "flags": flags, "resolution": resolution, "device": device, "seconds": seconds,
        "optimizer_seconds": optimizer_seconds,
        "torch_threads": torch.get_num_threads(), "baseline_rss": baseline,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "live": {"weights": live_bytes(model.parameters()), "optimizer": live_bytes(state),
                 "ema": live_bytes(ema.shadow_params) if ema is not None else 0},
    }
    result["measured"] = result["peak_rss"] - baseline
    if device == "cuda":
        result["measured"] = torch.cuda.max_memory_allocated()  # what the allocator held at the peak
        result["cuda_max_reserved"] = torch.cuda.max_memory_reserved()
    return result


# ---- the parent: children one at a time, the table ------------------------------------------------------


def available_bytes() -> int:
    with open("/proc/meminfo") as fh:
        info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in fh}
    return info["MemAvailable"]


def run_child(conf: Configuration, resolution: int, device: str, lock: str | None, need: float) -> dict:
    """One measurement in a fresh process, holding `lock` (a file) and after `need` bytes are available."""
    command = [sys.executable, __file__, "--child", json.dumps({"flags": list(conf.flags),
                                                                "resolution": resolution, "device": device})]
    with open(lock, "a") if lock else open(os.devnull) as fh:
        if lock:
            fcntl.flock(fh, fcntl.LOCK_EX)
        while device == "cpu" and available_bytes() < need:
            print(f"memory.py: waiting for {need / GB:.1f} GB of free memory "
                  f"({available_bytes() / GB:.1f} GB now)", flush=True)
            time.sleep(30)
        done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{conf.name} at {resolution} px failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def row(conf: Configuration, runs: dict[str, dict], device: str = "cpu") -> dict:
    """Exact bytes, the measurements (own or, on a CPU, `measured_as`'s), transients and the GPU estimate."""
    cfg = conf.config()
    static = static_bytes(cfg)
    twin = conf.measured_as if device == "cpu" else None
    source = runs.get(twin or conf.name, {})
    if device == "cpu":  # every byte is RAM, the EMA too wherever it is "kept"
        resident = sum(static_bytes(Configuration("", tuple(source["flags"])).config()).values()) if source else 0
    else:
        resident = device_bytes(cfg, static)
    measured = {int(side): m for side, m in source.get("sizes", {}).items()}
    transients = {side: m["measured"] - resident for side, m in measured.items()}
    return {"name": conf.name, "flags": list(conf.flags), "note": conf.note, "measured_as": twin,
            "ema_offloaded": cfg.use_ema and cfg.offload_ema,
            "static": static, "measured": {side: m["measured"] for side, m in measured.items()},
            "seconds": {side: m["seconds"] for side, m in measured.items()}, "transient": transients,
            "gpu_estimate": estimate(cfg, static, transients or None)}


def markdown(rows: list[dict], device: str = "cpu") -> str:
    where = "CPU" if device == "cpu" else "GPU"
    sides = sorted({side for r in rows for side in r["measured"]}) or list(RESOLUTIONS)
    w, h = TARGET_SIZE
    head = (["configuration", "flags on `--preset iclight`", "weights", "gradients", "optimizer", "EMA"]
            + [f"{where} step {s} px (measured)" for s in sides] + [f"GPU {w}x{h} (estimate)"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        st, est = r["static"], r["gpu_estimate"]
        cells = [r["name"], " ".join(f"`{f}`" for f in r["flags"]) or "(none)"]
        cells += [f"{st[k] / GB:.2f}" for k in ("weights", "gradients", "optimizer")]
        cells.append(f"{st['ema'] / GB:.2f}" + (" (CPU)" if r.get("ema_offloaded") else ""))
        for s in sides:
            if s in r["measured"] and r["measured_as"]:  # the twin's transient plus this row's own bytes
                cpu_bytes = sum(st.values()) if where == "CPU" else r["gpu_estimate"]["on_device"]
                cells.append(f"{(cpu_bytes + r['transient'][s]) / GB:.1f} (from *{r['measured_as']}*)")
            elif s in r["measured"]:
                cells.append(f"{r['measured'][s] / GB:.1f} ({r['seconds'][s]:.0f} s)")
            else:
                cells.append("not run")
        measured_any = bool(r["transient"])  # without a measured step only the exact bytes and the context
        cells.append(f"**{est['total'] / GB:.1f}**" if measured_any else f"at least {est['total'] / GB:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + (
        "\n\nGB = 10^9 bytes. Exact bytes from the parameter shapes; CPU figures: peak RSS of one training step "
        f"({MICRO_BATCHES} micro-batches of 1) minus the process's RSS before the UNet was built, with the "
        "seconds the step took; GPU estimate: the bytes kept on the GPU + the transient (measured minus exact "
        f"bytes) extrapolated to {w}x{h} + {CUDA_CONTEXT_GB:.1f} GB of CUDA context (bench/memory.py).\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Memory of one SD1.5-size training step per configuration.")
    parser.add_argument("--only", action="append", help="Configuration name to measure (repeatable).")
    parser.add_argument("--resolutions", type=int, nargs="+", default=list(RESOLUTIONS))
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--estimate_only", action="store_true", help="Run nothing; recompute the table.")
    parser.add_argument("--lock", default=None, help="A file to flock while a child runs (one at a time).")
    parser.add_argument("--min_free_gb", type=float, default=0.0,
                        help="Start a child only when this much memory is available (at least its own need).")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(measure_step(spec["flags"], spec["resolution"], spec["device"])))
        return 0

    confs = configurations()
    unknown = set(args.only or ()) - {c.name for c in confs}
    if unknown:
        parser.error(f"unknown configuration(s) {sorted(unknown)}; known: {[c.name for c in confs]}")
    path = args.output / ("memory.json" if args.device == "cpu" else f"memory-{args.device}.json")

    def saved_runs() -> dict:  # read again before each write: another run may have added rows meanwhile
        return json.loads(path.read_text())["runs"] if path.is_file() else {}

    if not args.estimate_only:
        for conf in confs:
            on_cpu = args.device == "cpu"  # a GPU measures every row: there the EMA's place matters
            if (args.only and conf.name not in args.only) or (on_cpu and (not conf.measure or conf.measured_as)):
                continue
            cfg_bytes = sum(static_bytes(conf.config()).values())
            for side in args.resolutions:
                need = max(cfg_bytes + 4 * GB, args.min_free_gb * GB)  # the step's transient, the interpreter
                print(f"memory.py: {conf.name} at {side} px ...", flush=True)
                result = run_child(conf, side, args.device, args.lock, need)
                runs = saved_runs()
                entry = runs.setdefault(conf.name, {"flags": list(conf.flags), "sizes": {}})
                entry["flags"], entry["sizes"][str(side)] = list(conf.flags), result
                print(f"memory.py:   {result['measured'] / GB:.2f} GB above the baseline, {result['seconds']:.0f} s",
                      flush=True)
                args.output.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps({"runs": runs}, indent=1))
    runs = saved_runs()
    rows = [row(c, runs, args.device) for c in confs]
    args.output.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"runs": runs, "rows": rows, "cuda_context_gb": CUDA_CONTEXT_GB,
                                "target_size": TARGET_SIZE}, indent=1))
    table = markdown(rows, args.device)
    path.with_suffix(".md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
