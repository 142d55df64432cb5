"""IC-Light fc relighting demo with EDDPM's learned steps (Gradio).

    python gradio_demo.py --checkpoint outputs/tiny   # a train.py output folder: "EDDPM (learned steps)" is the default
    python gradio_demo.py                             # SD1.5 + IC-Light fc + BriaRMBG from models/ (download_models.py)
    python gradio_demo.py --preset tiny               # tiny models built in code: CPU, no downloads

The layout follows IC-Light's fc demo (docs/iclight-facts.md, "Demo behaviour"): foreground upload and the
extracted foreground, prompt with quick subject and lighting lists, lighting preference, then images, seed,
size, and advanced options; a gallery of results on the right. Every run goes through `Relighter.relight`,
the code path relight.py and train.py's validation use. It binds to 127.0.0.1 unless --server_name, and
--share is opt-in. Each request is bounded before any work (eddpm/relighting.py, RequestLimits: images x steps
x megapixels, the images' megapixels, the prompts' length; defaults by device, raised by --max_work,
--max_megapixels, --max_prompt_chars), and a refused value is named in the message. Only the standard library and eddpm/cli.py are imported at module level (gradio, torch
and the models load in `main`), so `python gradio_demo.py --help` is instant.
"""

from __future__ import annotations

import argparse
import sys

from eddpm.cli import add_limit_args, add_model_args, load_models, one_line

TITLE = "IC-Light relighting (fc) with EDDPM learned steps"
# IC-Light's quick lists (docs/iclight-facts.md, "Quick lists").
QUICK_SUBJECTS = ["beautiful woman, detailed face", "handsome man, detailed face"]
QUICK_PROMPTS = [
    "sunshine from window", "neon light, city", "sunset over sea", "golden time", "sci-fi RGB glowing, cyberpunk",
    "natural lighting", "warm atmosphere, at home, bedroom", "magic lit", "evil, gothic, Yharnam",
    "light and shadow", "shadow from window", "soft studio lighting", "home atmosphere, cozy bedroom illumination",
    "neon, Wong Kar-wai, warm",
]
MAX_UPLOAD = "64mb"  # larger uploads are refused by Gradio before they reach Python


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="IC-Light fc relighting demo with EDDPM learned steps (Gradio).")
    add_model_args(parser)
    add_limit_args(parser)
    group = parser.add_argument_group("server")
    group.add_argument("--server_name", default="127.0.0.1",
                       help="Interface to bind (default: 127.0.0.1, this machine only; 0.0.0.0 exposes it).")
    group.add_argument("--port", type=int, default=None, help="Port (default: Gradio's, 7860 or the next free one).")
    group.add_argument("--share", action="store_true", help="Also open a public gradio.live link (needs internet).")
    return parser


def add_quick_prompt(choice: list[str], prompt: str) -> str:
    """IC-Light's lighting quick list: keep the first two comma-separated parts of the prompt, add the choice."""
    return ", ".join(prompt.split(", ")[:2] + [choice[0]])


def build_demo(relighter, matte_fn=None, notes: tuple[str, ...] = (), min_size: int | None = None):
    """The Gradio Blocks app around `relighter.relight`. `min_size` is the smallest width/height slider
    value: IC-Light's 256, or 64 for the tiny models (trained at 64 px)."""
    import gradio as gr
    import torch

    import db_examples
    from eddpm.relighting import prepare_foreground, read_upload
    from eddpm.settings import LIGHTING, SAMPLERS, RelightSettings, SettingsError, check_settings

    tiny = relighter.unet.config.block_out_channels[0] < 320  # SD1.5's UNet starts at 320 channels
    min_size = min_size or (64 if tiny else 256)
    defaults = RelightSettings()
    names = {key: name for name, key in SAMPLERS.items()}
    learned = f"{relighter.learned_steps} learned steps"
    sampler_choices = [(name.replace("learned steps", learned), key) for name, key in relighter.samplers.items()]

    def user_error(message: str) -> gr.Error:
        """A message for the user; bad input is not a server fault, so no traceback in the console."""
        return gr.Error(message, print_exception=False)

    def relight(input_fg, prompt, image_width, image_height, num_samples, seed, steps, a_prompt, n_prompt, cfg,
                highres_scale, highres_denoise, lowres_denoise, bg_source, sampler):
        # Raw values (the event has preprocess=False): the upload is {"path": ..., ...} or None.
        path = input_fg.get("path") if isinstance(input_fg, dict) else input_fg
        if not path:
            raise user_error("Upload a foreground image first (an RGBA PNG keeps its alpha as the matte).")
        try:
            rgb, alpha, notices = read_upload(path)
            # raw values from the request: check_settings refuses text or None for a number, naming the field
            settings = RelightSettings(
                prompt=_or(prompt, ""), width=_whole(image_width), height=_whole(image_height),
                steps=_whole(steps), guidance_scale=cfg, seed=_whole(seed), num_images=_whole(num_samples),
                lighting=_or(bg_source, "None"), lowres_denoise=lowres_denoise, highres_scale=highres_scale,
                highres_denoise=highres_denoise, added_prompt=_or(a_prompt, ""), negative_prompt=_or(n_prompt, ""),
                sampler=_or(sampler, relighter.default_sampler))
            notices += check_settings(settings, relighter)  # the relighter's request limits included
            foreground, matte_note = prepare_foreground(rgb, alpha, matte_fn)
        except ValueError as err:  # a setting, an upload that cannot be read
            raise user_error(one_line(err)) from err
        try:
            images, info = relighter.relight(foreground, settings)
        except SettingsError as err:  # anything else is a fault of the server: it keeps its traceback
            raise user_error(one_line(err)) from err
        except torch.OutOfMemoryError as err:
            raise user_error("Out of GPU memory: try a smaller size, fewer images or a lower highres scale.") from err
        for notice in notices:
            gr.Warning(notice)
        n, seconds = len(images), info["seconds"]
        lines = [f"**{names[info['sampler']]}**: {info['unet_calls']} UNet evaluations per image "
                 f"({' + '.join(map(str, info['steps']))} over {len(info['steps'])} pass(es); the images of a batch "
                 f"and a CFG pair share one evaluation), {seconds:.2f} s for {n} image(s) "
                 f"({seconds / n:.2f} s per image), {info['size'][0]}x{info['size'][1]}.",
                 *(f"- {line}" for line in [matte_note, *notices])]
        return foreground, images, "\n".join(lines)

    with gr.Blocks(title=TITLE) as demo:
        gr.Markdown(f"## {TITLE}\n" + "\n".join(f"- {note}" for note in notes) +
                    ("\n- Tiny models were trained at 64 px: sizes of 64-256 px relight in seconds on a CPU; "
                     "IC-Light's default 512x640 with the highres pass takes one to three minutes." if tiny else ""))
        with gr.Row():
            with gr.Column():
                with gr.Row():
                    input_fg = gr.Image(sources=["upload"], type="filepath", image_mode=None, label="Foreground",
                                        height=480)
                    output_fg = gr.Image(type="numpy", format="png", label="Extracted foreground (on gray)",
                                         height=480, interactive=False)
                prompt = gr.Textbox(label="Prompt", placeholder="may be empty: then only the added prompt is used")
                bg_source = gr.Radio(choices=list(LIGHTING), value=defaults.lighting,
                                     label="Lighting Preference (Initial Latent)", type="value")
                example_quick_subjects = gr.Dataset(samples=[[s] for s in QUICK_SUBJECTS], label="Subject Quick List",
                                                    samples_per_page=1000, components=[prompt])
                example_quick_prompts = gr.Dataset(samples=[[p] for p in QUICK_PROMPTS], label="Lighting Quick List",
                                                   samples_per_page=1000, components=[prompt])
                relight_button = gr.Button(value="Relight", variant="primary")
                with gr.Group():
                    sampler = gr.Dropdown(choices=sampler_choices, value=relighter.default_sampler, label="Sampler",
                                          info="EDDPM and Align Your Steps run their fixed steps; the others "
                                               "run Steps per pass.")
                    with gr.Row():
                        num_samples = gr.Slider(label="Images", minimum=1, maximum=12, value=defaults.num_images, step=1)
                        seed = gr.Number(label="Seed", value=defaults.seed, precision=0, minimum=0)
                    with gr.Row():
                        image_width = gr.Slider(label="Image Width", minimum=min_size, maximum=1024,
                                                value=defaults.width, step=64)
                        image_height = gr.Slider(label="Image Height", minimum=min_size, maximum=1024,
                                                 value=defaults.height, step=64)
                with gr.Accordion("Advanced options", open=False):
                    steps = gr.Slider(label="Steps", minimum=1, maximum=100, value=defaults.steps, step=1)
                    cfg = gr.Slider(label="CFG Scale", minimum=1.0, maximum=32.0, value=defaults.guidance_scale, step=0.01)
                    lowres_denoise = gr.Slider(label="Lowres Denoise (for initial latent)", minimum=0.1, maximum=1.0,
                                               value=defaults.lowres_denoise, step=0.01)
                    highres_scale = gr.Slider(label="Highres Scale", minimum=1.0, maximum=3.0,
                                              value=defaults.highres_scale, step=0.01)
                    highres_denoise = gr.Slider(label="Highres Denoise", minimum=0.1, maximum=1.0,
                                                value=defaults.highres_denoise, step=0.01)
                    a_prompt = gr.Textbox(label="Added Prompt", value=defaults.added_prompt)
                    n_prompt = gr.Textbox(label="Negative Prompt", value=defaults.negative_prompt)
            with gr.Column():
                result_gallery = gr.Gallery(height=832, object_fit="contain", label="Outputs", format="png",
                                            columns=2)
                run_info = gr.Markdown("Elapsed time and UNet evaluations per image appear here after a run.")
        inputs = [input_fg, prompt, image_width, image_height, num_samples, seed, steps, a_prompt, n_prompt, cfg,
                  highres_scale, highres_denoise, lowres_denoise, bg_source, sampler]
        # preprocess=False: Gradio would open the upload with Pillow first and answer a non-image with a
        # developer's message; read_upload (eddpm.images.load_image) names the problem instead. Gradio
        # still checks that the file is an upload, and check_settings checks every number.
        relight_button.click(fn=relight, inputs=inputs, outputs=[output_fg, result_gallery, run_info],
                             api_name="relight", preprocess=False)
        example_quick_prompts.click(add_quick_prompt, inputs=[example_quick_prompts, prompt], outputs=prompt,
                                    show_progress="hidden", queue=False, api_visibility="private")
        example_quick_subjects.click(lambda x: x[0], inputs=example_quick_subjects, outputs=prompt,
                                     show_progress="hidden", queue=False, api_visibility="private")
        gr.Examples(examples=db_examples.examples, inputs=[input_fg, prompt, bg_source, image_width, image_height, seed],
                    label="Examples (bundled synthetic foregrounds; a click fills the inputs)", run_on_click=False,
                    examples_per_page=20)
    return demo


def _whole(value):
    """Gradio sends numbers as floats; whole ones become ints, anything else stays for check_settings to refuse."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _or(value, default):
    """A text field's value, `default` when the request leaves it out (None or empty)."""
    return default if value is None or value == "" else value


def launch(demo, server_name: str = "127.0.0.1", port: int | None = None, share: bool = False,
           block: bool = True):
    """Queue requests (one relight at a time; the rest wait their turn) and serve."""
    demo.queue(max_size=32, default_concurrency_limit=1)
    return demo.launch(server_name=server_name, server_port=port, share=share, show_error=True,
                       max_file_size=MAX_UPLOAD, prevent_thread_lock=not block, ssr_mode=False,
                       footer_links=["api", "gradio"])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        relighter, matte_fn, notes = load_models(args)
    except (ValueError, OSError) as err:  # missing weights or an incomplete checkpoint: one line, no traceback
        print(f"gradio_demo.py: error: {one_line(err)}", file=sys.stderr)
        return 2
    for note in notes:
        print(f"gradio_demo.py: {note}")
    launch(build_demo(relighter, matte_fn, notes), args.server_name, args.port, args.share)
    return 0


if __name__ == "__main__":
    sys.exit(main())
