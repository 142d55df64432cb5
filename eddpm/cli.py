"""What relight.py and gradio_demo.py share on the command line: the model flags, loading the models
they name, and one-line error messages.

Only the standard library and eddpm.iclight's constants are imported at module level, so
`python gradio_demo.py --help` and `python relight.py --help` stay fast; the models load in `load_models`.
"""

from __future__ import annotations

import argparse

from eddpm import iclight  # constants only: no torch


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """Where the weights come from; the defaults are eddpm.iclight's DEFAULT_* paths."""
    group = parser.add_argument_group("models")
    group.add_argument("--checkpoint", default=None,
                       help="A train.py output folder (config.json, unet/, scheduler/): its trained UNet and "
                            "its learned EDDPM steps, which become the default sampler.")
    group.add_argument("--preset", choices=["tiny"], default=None,
                       help="tiny: the small models built in code (CPU, no downloads, no background remover).")
    group.add_argument("--base_model", default=None,
                       help="Base SD1.5 in diffusers layout, a folder or hub id (default: "
                            f"{iclight.DEFAULT_BASE_DIR}; ignored with --checkpoint, whose config names it).")
    group.add_argument("--offset_path", default=None,
                       help="IC-Light fc offsets added to the base UNet (default: "
                            f"{iclight.DEFAULT_ICLIGHT_PATH}; not used with --checkpoint or --preset tiny).")
    group.add_argument("--lora", default=None,
                       help="A LoRA to fold into the UNet: pytorch_lora_weights.safetensors or the folder holding it "
                            "(a train.py --lora_rank output folder: its conv_in.safetensors is applied too). On its "
                            "own it applies to the base IC-Light model; the run's learned steps need --checkpoint.")
    group.add_argument("--lora_scale", type=float, default=1.0,
                       help="Strength of --lora: W + scale * BA, and conv_in moved the same fraction of the way.")
    group.add_argument("--rmbg_path", default=None,
                       help=f"BriaRMBG folder for background removal (default: {iclight.DEFAULT_RMBG_DIR}; "
                            "without it the upload's alpha channel is used, or the image as is).")
    group.add_argument("--device", default=None, help="cuda, mps or cpu (default: the first available).")


def add_limit_args(parser: argparse.ArgumentParser) -> None:
    """What one relight request may cost (eddpm.relighting.RequestLimits); the defaults depend on the device."""
    group = parser.add_argument_group("request limits (defaults: eddpm/relighting.py, REQUEST_LIMITS)")
    group.add_argument("--max_work", type=float, default=None,
                       help="Largest request in megapixel-steps: images x steps x megapixels, summed over the two "
                            "passes (default: 60 on a CPU, 2000 on CUDA; IC-Light's defaults cost 27).")
    group.add_argument("--max_megapixels", type=float, default=None,
                       help="Largest images x megapixels of the larger pass, which the VAE decodes at once "
                            "(default: 2.5 on a CPU, 24 on CUDA).")
    group.add_argument("--max_prompt_chars", type=int, default=None,
                       help="Longest prompt, added prompt or negative prompt in characters (default: 1000).")


def request_limits_from(args: argparse.Namespace, device_type: str | None = None):
    """The RequestLimits of the device (`device_type`, else --device, else the first available), with the
    limit flags applied."""
    from eddpm.relighting import default_device
    from eddpm.settings import request_limits

    device_type = device_type or (args.device.split(":")[0] if args.device else default_device().type)
    return request_limits(device_type, **{name: getattr(args, name, None)
                                          for name in ("max_work", "max_megapixels", "max_prompt_chars")})


def load_models(args: argparse.Namespace):
    """(Relighter, matte_fn or None, notes): the models named by add_model_args' flags; the relighter carries
    the request limits of add_limit_args' flags (the device's defaults without them)."""
    from eddpm.relighting import check_output_folder, load_background_remover, load_relighter

    tiny = args.preset == "tiny"
    lora, lora_note = getattr(args, "lora", None), ""
    if lora is not None:
        from eddpm.lora import find_lora_files

        lora_file, conv_in = find_lora_files(lora)  # before anything heavy, so a bad path fails at once
        lora_note = f" + LoRA {lora_file} x {args.lora_scale:g}" + (" with its conv_in" if conv_in else "")
    lora_args = dict(lora=lora, lora_scale=getattr(args, "lora_scale", 1.0))
    if args.checkpoint is not None:
        check_output_folder(args.checkpoint)  # before anything heavy, so a bad folder fails at once
        relighter = load_relighter(args.checkpoint, device=args.device, **lora_args)
        source = f"checkpoint {args.checkpoint} ({relighter.learned_steps} learned EDDPM steps)"
    else:
        base = "tiny" if tiny else (args.base_model or str(iclight.DEFAULT_BASE_DIR))
        offsets = None if tiny or base == "tiny" else (args.offset_path or str(iclight.DEFAULT_ICLIGHT_PATH))
        relighter = load_relighter(None, base_model=base, offset_path=offsets, device=args.device, **lora_args)
        source = "tiny models (untrained, for smoke tests)" if base == "tiny" else f"{base} + {offsets}"
    source += lora_note
    relighter.limits = request_limits_from(args, relighter.device.type)
    rmbg_path = None if tiny else (args.rmbg_path or str(iclight.DEFAULT_RMBG_DIR))
    matte_fn, matte_note = load_background_remover(rmbg_path, relighter.device)
    notes = [f"Models: {source} on {relighter.device.type} ({str(relighter.dtype).removeprefix('torch.')}).",
             matte_note, f"Request limits on {relighter.device.type}: {relighter.limits.max_work:g} megapixel-steps "
             f"(images x steps x megapixels of each pass), {relighter.limits.max_megapixels:g} megapixels of "
             f"images at once, {relighter.limits.max_prompt_chars} characters per prompt (--max_work, "
             "--max_megapixels, --max_prompt_chars)."]
    return relighter, matte_fn, notes


def one_line(err: BaseException) -> str:
    """An exception's message on one line (multi-line messages, such as lists of missing files, joined)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return "; ".join(lines) or err.__class__.__name__
