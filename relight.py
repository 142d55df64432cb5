"""Relight a foreground from the command line: the demo's code path (`Relighter.relight`), for batch use.

    python relight.py --checkpoint outputs/tiny --input fg.png --prompt "sunset over sea" --output out.png
    python relight.py --input fg.png --prompt "neon light, city" --lighting Left --output out.png  # models/
    python relight.py --preset tiny --input data/synthetic/condition/00000.png --output out.png   # CPU smoke run
    python relight.py --checkpoint outputs/tiny --benchmark   # UNet calls and seconds per image, per sampler

Every RelightSettings field is a flag (`--width`, `--steps`, `--sampler`, `--highres_scale`, ...) with
IC-Light's demo defaults. Bad input (a missing or non-image file, a size that is not a multiple of 64, an
incomplete checkpoint folder) exits with status 2 and one line on stderr.

Only the standard library is imported at module level: gradio_demo.py imports `add_model_args` and
`load_models` from here, and `python gradio_demo.py --help` stays fast.
"""

from __future__ import annotations

import argparse
import os
import sys


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """Where the weights come from; shared with gradio_demo.py. Defaults are eddpm.iclight's constants."""
    group = parser.add_argument_group("models")
    group.add_argument("--checkpoint", default=None,
                       help="A train.py output folder (config.json, unet/, scheduler/): its trained UNet and "
                            "its learned EDDPM steps, which become the default sampler.")
    group.add_argument("--preset", choices=["tiny"], default=None,
                       help="tiny: the small models built in code (CPU, no downloads, no background remover).")
    group.add_argument("--base_model", default=None,
                       help="Base SD1.5 in diffusers layout, a folder or hub id (default: "
                            "models/realistic-vision-v51; ignored with --checkpoint, whose config names it).")
    group.add_argument("--offset_path", default=None,
                       help="IC-Light fc offsets added to the base UNet (default: "
                            "models/iclight_sd15_fc.safetensors; not used with --checkpoint or --preset tiny).")
    group.add_argument("--rmbg_path", default=None,
                       help="BriaRMBG folder for background removal (default: models/RMBG-1.4; without it "
                            "the upload's alpha channel is used, or the image as is).")
    group.add_argument("--device", default=None, help="cuda, mps or cpu (default: the first available).")


def load_models(args: argparse.Namespace):
    """(Relighter, matte_fn or None, notes): the models named by add_model_args' flags."""
    from eddpm import iclight
    from eddpm.pipeline import check_output_folder, load_background_remover, load_relighter

    tiny = args.preset == "tiny"
    if args.checkpoint is not None:
        check_output_folder(args.checkpoint)  # before anything heavy, so a bad folder fails at once
        relighter = load_relighter(args.checkpoint, device=args.device)
        source = f"checkpoint {args.checkpoint} ({relighter.learned_steps} learned EDDPM steps)"
    else:
        base = "tiny" if tiny else (args.base_model or str(iclight.DEFAULT_BASE_DIR))
        offsets = None if tiny or base == "tiny" else (args.offset_path or str(iclight.DEFAULT_ICLIGHT_PATH))
        relighter = load_relighter(None, base_model=base, offset_path=offsets, device=args.device)
        source = "tiny models (untrained, for smoke tests)" if base == "tiny" else f"{base} + {offsets}"
    rmbg_path = None if tiny else (args.rmbg_path or str(iclight.DEFAULT_RMBG_DIR))
    matte_fn, matte_note = load_background_remover(rmbg_path, relighter.device)
    notes = [f"Models: {source} on {relighter.device.type} ({str(relighter.dtype).removeprefix('torch.')}).",
             matte_note]
    return relighter, matte_fn, notes


def one_line(err: BaseException) -> str:
    """An exception's message on one line (multi-line messages, such as lists of missing files, joined)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return "; ".join(lines) or err.__class__.__name__


def build_parser() -> argparse.ArgumentParser:
    import dataclasses

    from eddpm.pipeline import LIGHTING, SAMPLERS, RelightSettings

    parser = argparse.ArgumentParser(
        description="Relight a foreground with IC-Light fc (the demo's code path). Bad input exits with status 2.")
    parser.add_argument("--input", help="Foreground image (RGBA PNG: its alpha is the matte without RMBG).")
    parser.add_argument("--output", help="Where to write the relit image (PNG/JPEG/WebP); with --num_images N "
                                         "the files are OUT-0.png ... OUT-{N-1}.png.")
    parser.add_argument("--foreground_output", default=None, help="Also write the foreground on gray here.")
    parser.add_argument("--benchmark", action="store_true",
                        help="Relight --input (default: the first bundled synthetic foreground) with every "
                             "available sampler and print a table of UNet calls and seconds per image.")
    parser.add_argument("--repeats", type=int, default=3, help="Timed runs per sampler with --benchmark.")
    add_model_args(parser)
    group = parser.add_argument_group("relight settings (IC-Light's demo defaults)")
    for f in dataclasses.fields(RelightSettings):
        extra = dict(type=type(f.default), default=f.default)
        help_text = f"{f.metadata['help']} (default: %(default)s)"
        if f.name == "sampler":
            extra = dict(choices=list(SAMPLERS.values()), default=None)
            help_text = f"{f.metadata['help']} Default: eddpm with --checkpoint, else dpmpp_2m_sde_karras."
        elif f.name == "lighting":
            extra["choices"] = list(LIGHTING)
        group.add_argument(f"--{f.name}", help=help_text, **extra)
    return parser


def output_paths(output: str, count: int) -> list[str]:
    if count == 1:
        return [output]
    stem, ext = os.path.splitext(output)
    return [f"{stem}-{i}{ext}" for i in range(count)]


def run(args: argparse.Namespace) -> int:
    import dataclasses

    import numpy as np
    from PIL import Image

    from eddpm.pipeline import RelightSettings, check_settings, load_image, prepare_foreground

    if not args.benchmark and (args.input is None or args.output is None):
        raise ValueError("--input and --output are required (or use --benchmark)")
    if args.output is not None and os.path.splitext(args.output)[1].lower() not in Image.registered_extensions():
        raise ValueError(f"--output {args.output}: unknown image file extension (use .png, .jpg or .webp)")
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(RelightSettings)}
    settings = RelightSettings(**{**values, "sampler": values["sampler"] or "dpmpp_2m_sde_karras"})
    check_settings(settings)  # fail before loading any model
    if settings.sampler == "eddpm" and args.checkpoint is None:
        raise ValueError("--sampler eddpm needs --checkpoint (a train.py output folder with learned steps)")
    input_path = args.input or os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "synthetic",
                                            "condition", "00000.png")
    image, notices = load_image(input_path)

    relighter, matte_fn, notes = load_models(args)
    settings.sampler = values["sampler"] or relighter.default_sampler
    notices += check_settings(settings, relighter)
    for line in notes + notices:
        print(f"relight.py: {line}")
    foreground, matte_note = prepare_foreground(image, matte_fn)
    print(f"relight.py: {matte_note}")
    if args.benchmark:
        return benchmark(relighter, foreground, settings, args.repeats)

    images, info = relighter.relight(foreground, settings)
    paths = output_paths(args.output, len(images))
    for path, relit in zip(paths, images):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        Image.fromarray(relit).save(path)
    if args.foreground_output:
        Image.fromarray(np.ascontiguousarray(foreground)).save(args.foreground_output)
    n = len(images)
    print(f"relight.py: wrote {', '.join(paths)} ({info['size'][0]}x{info['size'][1]}); sampler {info['sampler']}: "
          f"{info['unet_calls']} UNet calls per image (passes {info['steps']}), {info['seconds']:.2f} s "
          f"for {n} image(s), {info['seconds'] / n:.2f} s per image")
    return 0


def benchmark(relighter, foreground, settings, repeats: int) -> int:
    """Print a Markdown table: per sampler, UNet calls per image and the median seconds per image."""
    import dataclasses
    import statistics

    from eddpm.pipeline import SAMPLERS

    names = {key: name for name, key in SAMPLERS.items()}
    relighter.relight(foreground, dataclasses.replace(settings, sampler=relighter.default_sampler))  # warm-up
    s = settings
    print(f"\nrelight.py --benchmark: {s.width}x{s.height}, highres x{s.highres_scale} (denoise {s.highres_denoise}), "
          f"lighting {s.lighting}, steps {s.steps}, CFG {s.guidance_scale}, {s.num_images} image(s), "
          f"{relighter.device.type}, torch threads {__import__('torch').get_num_threads()}, median of {repeats}\n")
    print("| sampler | UNet calls per image (per pass) | seconds per image |")
    print("|---|---|---|")
    for key in relighter.samplers.values():
        times = []
        for _ in range(max(1, repeats)):
            _, info = relighter.relight(foreground, dataclasses.replace(settings, sampler=key))
            times.append(info["seconds"] / s.num_images)
        passes = " + ".join(str(c) for c in info["steps"])
        print(f"| {names[key]} | {info['unet_calls']} ({passes}) | {statistics.median(times):.2f} |")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (ValueError, OSError) as err:  # bad input or missing files: one line, no traceback
        print(f"relight.py: error: {one_line(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
