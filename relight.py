"""Relight a foreground from the command line: the demo's code path (`Relighter.relight`), for batch use.

    python relight.py --checkpoint outputs/tiny --input fg.png --prompt "sunset over sea" --output out.png
    python relight.py --input fg.png --prompt "neon light, city" --lighting Left --output out.png  # models/
    python relight.py --preset tiny --input data/synthetic/condition/00000.png --output out.png   # CPU smoke run
    python relight.py --checkpoint outputs/tiny --benchmark   # UNet calls and seconds per image, per sampler

Every RelightSettings field is a flag (`--width`, `--steps`, `--sampler`, `--highres_scale`, ...) with
IC-Light's demo defaults. Bad input (a missing or non-image file, a size that is not a multiple of 64, an
incomplete checkpoint folder, missing weights, a request beyond --max_work, --max_megapixels or
--max_prompt_chars, whose defaults depend on the device) exits with status 2 and one line on stderr; an
unexpected error keeps its traceback.

The model flags and loading come from eddpm/cli.py (shared with gradio_demo.py). `--help` imports only
eddpm.relighting's settings (the standard library and numpy), so it stays fast.
"""

from __future__ import annotations

import argparse
import os
import sys

from eddpm.cli import add_limit_args, add_model_args, load_models, one_line, request_limits_from


def build_parser() -> argparse.ArgumentParser:
    import dataclasses

    from eddpm.settings import ICLIGHT_SAMPLER, LIGHTING, SAMPLERS, RelightSettings

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
    add_limit_args(parser)
    group = parser.add_argument_group("relight settings (IC-Light's demo defaults)")
    for f in dataclasses.fields(RelightSettings):
        extra = dict(type=type(f.default), default=f.default)
        help_text = f"{f.metadata['help']} (default: %(default)s)"
        if f.name == "sampler":
            extra = dict(choices=list(SAMPLERS.values()), default=None)
            help_text = (f"{f.metadata['help']} Default: eddpm with --checkpoint, else {ICLIGHT_SAMPLER} "
                         "(IC-Light's demo sampler).")
        elif f.name == "lighting":
            extra["choices"] = list(LIGHTING)
        group.add_argument(f"--{f.name}", help=help_text, **extra)
    return parser


def output_paths(output: str, count: int) -> list[str]:
    if count == 1:
        return [output]
    stem, ext = os.path.splitext(output)
    return [f"{stem}-{i}{ext}" for i in range(count)]


def prepare(args: argparse.Namespace):
    """Check the flags, read the input, load the models; returns the job that relights and writes (a
    function of no argument returning the exit status). Every failure here is the user's to fix."""
    import dataclasses

    from PIL import Image

    from eddpm.relighting import prepare_foreground, read_upload
    from eddpm.settings import EDDPM_SAMPLERS, ICLIGHT_SAMPLER, RelightSettings, check_settings

    if not args.benchmark and (args.input is None or args.output is None):
        raise ValueError("--input and --output are required (or use --benchmark)")
    if args.output is not None and os.path.splitext(args.output)[1].lower() not in Image.registered_extensions():
        raise ValueError(f"--output {args.output}: unknown image file extension (use .png, .jpg or .webp)")
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(RelightSettings)}
    settings = RelightSettings(**{**values, "sampler": values["sampler"] or ICLIGHT_SAMPLER})
    check_settings(settings, limits=request_limits_from(args))  # fail before loading any model
    if settings.sampler in EDDPM_SAMPLERS and args.checkpoint is None:
        raise ValueError(f"--sampler {settings.sampler} needs --checkpoint (a train.py output folder with "
                         "learned steps)")
    input_path = args.input or os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "synthetic",
                                            "condition", "00000.png")
    rgb, alpha, notices = read_upload(input_path)

    relighter, matte_fn, notes = load_models(args)
    settings.sampler = values["sampler"] or relighter.default_sampler
    notices += check_settings(settings, relighter)
    for line in notes + notices:
        print(f"relight.py: {line}")
    foreground, matte_note = prepare_foreground(rgb, alpha, matte_fn)
    print(f"relight.py: {matte_note}")
    if args.benchmark:
        return lambda: benchmark(relighter, foreground, settings, args.repeats)
    return lambda: relight_and_write(args, relighter, foreground, settings)


def relight_and_write(args: argparse.Namespace, relighter, foreground, settings) -> int:
    import numpy as np
    from PIL import Image

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

    from eddpm.settings import SAMPLERS

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
    from eddpm.settings import SettingsError

    args = build_parser().parse_args(argv)
    try:
        job = prepare(args)
    except (ValueError, OSError) as err:  # bad flags, input or model files: one line, no traceback
        print(f"relight.py: error: {one_line(err)}", file=sys.stderr)
        return 2
    try:
        return job()
    except (SettingsError, OSError) as err:  # a refused setting, an unwritable output; the rest keep a traceback
        print(f"relight.py: error: {one_line(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
