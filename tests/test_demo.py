"""gradio_demo.py, relight.py, db_examples.py and eddpm/cli.py: the demo driven through gradio_client, the
CLI end to end. (The relighter's passes are checked in tests/test_relighting.py.)

A tiny train.py output folder (config.json, unet/, scheduler/ with 4 learned steps) is built once per
session in a second instead of training (tests/test_train.py covers what train.py writes; the `slow` test
below runs the real thing). The demo runs in this process on 127.0.0.1 and a free port; the CLI runs as a
subprocess where its exit status and stderr are the point, in-process otherwise.
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = [  # third-party noise: diffusers' schedulers on numpy 2, gradio's example table on pandas
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning:gradio.*"),
    pytest.mark.filterwarnings("ignore::FutureWarning:gradio.*"),
]
REPO = Path(__file__).resolve().parents[1]
# One torch thread per process: the tensors are tiny, and on a busy 2-core machine OpenMP threads that
# wait for each other made a 64 px relight 20x slower.
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "1"}
LEARNED_STEPS = 4
SAMPLER_KEYS = ["eddpm", "eddpm_dpmpp_2m", "eddpm_ddim", "dpmpp_2m_sde_karras_iclight", "dpmpp_2m_sde_karras",
                "ays_dpmpp_2m", "ddim", "euler_a"]
KEPT = [999, 700, 400, 100]  # the learned steps of tiny_output_dir
AYS = [999, 850, 736, 645, 545, 455, 343, 233, 124, 24]  # Align Your Steps, SD1.5 (Sabour et al. 2024)
FOREGROUND = REPO / "data" / "synthetic" / "condition" / "00001.png"  # RGBA, 128 x 128

# The API of the "Relight" button, in the order of its inputs, with small fast values (64 px, 4 steps).
FAST = dict(input_fg=None, prompt="sunset over sea", image_width=64, image_height=64, num_samples=1, seed=7,
            steps=4, a_prompt="best quality", n_prompt="lowres", cfg=2.0, highres_scale=1.5, highres_denoise=0.5,
            lowres_denoise=0.9, bg_source="None", sampler="ddim")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def expected_unet_calls(sampler: str, steps: int, lighting: str, lowres: float, highres: float) -> int:
    """Re-derived from docs/iclight-facts.md ("Demo behaviour"): img2img passes schedule
    round(steps / denoise) steps and run int(scheduled * denoise) of them; fixed schedules (learned EDDPM
    steps, Align Your Steps' 10) cap what is scheduled."""
    cap = LEARNED_STEPS if sampler.startswith("eddpm") else len(AYS) if sampler == "ays_dpmpp_2m" else 10**9
    first = min(steps, cap) if lighting == "None" else int(min(round(steps / lowres), cap) * lowres)
    return first + int(min(round(steps / highres), cap) * highres)


@pytest.fixture(scope="session")
def tiny_output_dir(tmp_path_factory):
    """What `train.py --preset tiny` leaves for the demo: config.json, unet/, scheduler/ (learned steps)."""
    from eddpm.iclight import SD15_SCHEDULER_CONFIG
    from eddpm.scheduler import EDDPMScheduler
    from eddpm.tiny import build_tiny_components

    out = tmp_path_factory.mktemp("tiny_output")
    build_tiny_components(seed=0).unet.save_pretrained(out / "unet", safe_serialization=True)
    scores = np.full(1000, 0.01)
    scores[KEPT] = 0.9  # the kept steps
    EDDPMScheduler.from_config(SD15_SCHEDULER_CONFIG, scores=scores.tolist(), num_kept_steps=LEARNED_STEPS,
                               mask_mode="respaced").save_pretrained(out / "scheduler")
    (out / "config.json").write_text(json.dumps({"base_model": "tiny", "seed": 0, "resolution": 64}))
    return out


@pytest.fixture(scope="module")
def served(tiny_output_dir):
    """The demo on the tiny output folder, launched as gradio_demo.main does, with a gradio_client Client."""
    import torch
    from gradio_client import Client

    import gradio_demo

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    args = gradio_demo.build_parser().parse_args(["--checkpoint", str(tiny_output_dir), "--port", str(free_port())])
    relighter, matte_fn, notes = gradio_demo.load_models(args)
    demo = gradio_demo.build_demo(relighter, matte_fn, notes)
    gradio_demo.launch(demo, args.server_name, args.port, block=False)
    client = Client(f"http://127.0.0.1:{args.port}/", verbose=False)
    yield demo, client
    demo.close()
    torch.set_num_threads(threads)


def call(client, **overrides):
    """Press "Relight" through the API; returns (foreground path, gallery image paths, info text)."""
    from gradio_client import handle_file

    values = {**FAST, "input_fg": FOREGROUND, **overrides}
    if values["input_fg"] is not None:
        values["input_fg"] = handle_file(str(values["input_fg"]))
    foreground, gallery, info = client.predict(*values.values(), api_name="/relight")
    return foreground, [item["image"] for item in gallery], info


def app_error(client, **overrides) -> str:
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as caught:
        call(client, **overrides)
    return str(caught.value)


# ---------------------------------------------------------------------------------------------------
# Import and command line of gradio_demo.py
# ---------------------------------------------------------------------------------------------------


def imported_heavy_modules(code: str) -> list[str]:
    code += ("; import json, sys; print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & "
             "{'torch', 'gradio', 'diffusers', 'transformers', 'numpy', 'PIL'})))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.splitlines()[-1])


def help_text(script: str) -> str:
    start = time.perf_counter()
    out = subprocess.run([sys.executable, script, "--help"], cwd=REPO, env=ENV, capture_output=True, text=True,
                         timeout=60)
    elapsed = time.perf_counter() - start
    assert out.returncode == 0, out.stderr
    assert elapsed < 3.0, f"{script} --help took {elapsed:.1f} s"
    return " ".join(out.stdout.split())


def test_gradio_demo_imports_without_heavy_modules_and_help_is_fast():
    assert imported_heavy_modules("import gradio_demo") == []
    text = help_text("gradio_demo.py")
    for flag in ("--checkpoint", "--preset", "--base_model", "--offset_path", "--rmbg_path", "--server_name",
                 "--port", "--share", "127.0.0.1"):
        assert flag in text, f"{flag} missing from --help:\n{text}"


def test_relight_help_is_fast_and_lists_every_sampler():
    # The parser reads RelightSettings (eddpm.settings, standard library only): no numpy, torch, diffusers or Pillow.
    assert imported_heavy_modules("import relight; relight.build_parser()") == []
    text = help_text("relight.py")
    for key in SAMPLER_KEYS:
        assert key in text, f"{key} missing from relight.py --help"
    assert "else dpmpp_2m_sde_karras_iclight (IC-Light's demo sampler)" in text


def test_model_flag_defaults_are_the_iclight_constants(tmp_path, monkeypatch):
    """The help text names eddpm.iclight's paths, and without --preset those are the paths loaded."""
    import gradio_demo
    from eddpm import iclight
    from eddpm.cli import load_models
    from eddpm.iclight import MissingWeightsError

    help_text = gradio_demo.build_parser().format_help()
    for path in (iclight.DEFAULT_BASE_DIR, iclight.DEFAULT_ICLIGHT_PATH, iclight.DEFAULT_RMBG_DIR):
        assert str(path) in " ".join(help_text.split()), f"{path} not in --help"
    args = gradio_demo.build_parser().parse_args([])
    assert (args.server_name, args.port, args.share) == ("127.0.0.1", None, False)
    monkeypatch.chdir(tmp_path)  # no models/ here: the error must name the default base model folder
    with pytest.raises(MissingWeightsError, match=str(iclight.DEFAULT_BASE_DIR)):
        load_models(args)


def test_preset_tiny_needs_no_files_and_offers_no_eddpm():
    import gradio_demo

    relighter, matte_fn, notes = gradio_demo.load_models(gradio_demo.build_parser().parse_args(["--preset", "tiny"]))
    assert matte_fn is None and relighter.eddpm_scheduler is None
    # No learned steps: IC-Light's own demo sampler is the default (tests/test_relighting.py checks its config).
    assert relighter.default_sampler == "dpmpp_2m_sde_karras_iclight"
    assert list(relighter.samplers.values()) == [k for k in SAMPLER_KEYS if not k.startswith("eddpm")]
    assert any("No background remover" in note for note in notes), notes


def test_gradio_demo_incomplete_checkpoint_exits_with_one_line(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    out = subprocess.run([sys.executable, "gradio_demo.py", "--checkpoint", str(tmp_path)], cwd=REPO, env=ENV,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out
    assert "Traceback" not in out.stderr, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "missing unet/config.json" in lines[0], out.stderr


# ---------------------------------------------------------------------------------------------------
# The demo through gradio_client
# ---------------------------------------------------------------------------------------------------


def test_demo_layout_and_defaults(served):
    """IC-Light's fc controls with its defaults (docs/iclight-facts.md, "Demo behaviour"), on 127.0.0.1."""
    import gradio as gr

    import gradio_demo

    demo, _ = served
    assert demo.server_name == "127.0.0.1"
    assert demo.enable_queue and demo._queue.default_concurrency_limit == 1
    by_label = {b.label: b for b in demo.blocks.values() if getattr(b, "label", None)}
    expected = {"Image Width": 512, "Image Height": 640, "Steps": 25, "CFG Scale": 2.0, "Seed": 12345,
                "Images": 1, "Lowres Denoise (for initial latent)": 0.9,
                "Highres Scale": 1.5, "Highres Denoise": 0.5,
                "Added Prompt": "best quality",
                "Negative Prompt": "lowres, bad anatomy, bad hands, cropped, worst quality",
                "Lighting Preference (Initial Latent)": "None", "Sampler": "eddpm"}
    for label, value in expected.items():
        assert by_label[label].value == value, f"{label}: {by_label[label].value!r} != {value!r}"
    assert by_label["Image Width"].step == 64 and by_label["Image Width"].maximum == 1024
    assert by_label["Lighting Preference (Initial Latent)"].choices == [(c, c) for c in
                                                                         ("None", "Left", "Right", "Top", "Bottom")]
    samplers = dict((value, name) for name, value in by_label["Sampler"].choices)
    assert list(samplers) == SAMPLER_KEYS
    assert samplers["eddpm"] == f"EDDPM ({LEARNED_STEPS} learned steps)"
    assert samplers["eddpm_dpmpp_2m"] == f"DPM-Solver++ 2M on the {LEARNED_STEPS} learned steps"
    assert samplers["dpmpp_2m_sde_karras"] == "DPM++ 2M SDE Karras (SD1.5 scaled_linear betas)"
    assert isinstance(by_label["Outputs"], gr.Gallery)
    assert isinstance(by_label["Extracted foreground (on gray)"], gr.Image)
    assert [s[0] for s in by_label["Lighting Quick List"].samples] == gradio_demo.QUICK_PROMPTS
    assert len(gradio_demo.QUICK_PROMPTS) == 14 and "neon, Wong Kar-wai, warm" in gradio_demo.QUICK_PROMPTS
    assert gradio_demo.add_quick_prompt(["golden time"], "man, face, sunset over sea") == "man, face, golden time"


@pytest.mark.parametrize("sampler,lighting", [("eddpm", "None"), ("eddpm", "Right"), ("eddpm_dpmpp_2m", "Left"),
                                              ("eddpm_ddim", "None"), ("dpmpp_2m_sde_karras", "Left"),
                                              ("dpmpp_2m_sde_karras_iclight", "None"), ("ays_dpmpp_2m", "Right"),
                                              ("ddim", "Top"), ("euler_a", "Bottom")])
def test_every_sampler_returns_images(served, sampler, lighting):
    _, client = served
    foreground, images, info = call(client, sampler=sampler, bg_source=lighting, num_samples=2)
    assert len(images) == 2
    for path in images:
        relit = np.asarray(Image.open(path))
        assert relit.shape == (128, 128, 3), relit.shape  # 64 px times highres 1.5, rounded to 64
        assert relit.std() > 0, "a constant image"
    calls = expected_unet_calls(sampler, 4, lighting, 0.9, 0.5)
    assert f"{calls} UNet evaluations per image" in info, info
    assert " s per image" in info and "128x128" in info, info
    # The extracted foreground: the RGBA upload's alpha over gray 127 (no background remover here).
    rgba = np.asarray(Image.open(FOREGROUND)).astype(np.float32)
    expected = np.clip(127 + (rgba[..., :3] - 127) * rgba[..., 3:] / 255, 0, 255).astype(np.uint8)
    shown = np.asarray(Image.open(foreground).convert("RGB"))
    assert np.abs(shown.astype(int) - expected).max() <= 1
    assert "alpha channel is the matte" in info, info


def test_same_seed_same_images(served):
    _, client = served
    first = [np.asarray(Image.open(p)) for p in call(client, seed=3, sampler="euler_a")[1]]
    again = [np.asarray(Image.open(p)) for p in call(client, seed=3, sampler="euler_a")[1]]
    other = [np.asarray(Image.open(p)) for p in call(client, seed=4, sampler="euler_a")[1]]
    assert np.array_equal(first[0], again[0])
    assert not np.array_equal(first[0], other[0])


def test_highres_scale_one_runs_the_second_pass_at_the_same_size_and_eddpm_step_notice(served):
    _, client = served
    _, images, info = call(client, sampler="eddpm", highres_scale=1.0, steps=25)
    assert np.asarray(Image.open(images[0])).shape == (64, 64, 3)
    calls = expected_unet_calls("eddpm", 25, "None", 0.9, 0.5)  # 4 + 2: IC-Light always runs the second pass
    assert f"{calls} UNet evaluations per image ({LEARNED_STEPS} + 2 over 2 pass(es)" in info, info
    assert f"EDDPM runs its {LEARNED_STEPS} learned steps (asked for 25)" in info, info


def test_bad_inputs_give_clear_messages(served, tmp_path):
    _, client = served
    assert "Upload a foreground image first" in app_error(client, input_fg=None)
    text_file = tmp_path / "notes.png"
    text_file.write_text("not an image")
    message = app_error(client, input_fg=text_file)
    assert "unreadable image: notes.png" in message, message
    message = app_error(client, image_width=100)
    assert "multiples of 64" in message and "100x64" in message, message
    message = app_error(client, highres_scale=5.0)
    assert "highres_scale must be in [1, 3]" in message, message
    message = app_error(client, sampler="euler")
    assert "unknown sampler 'euler'" in message, message


def test_empty_prompt_is_allowed_with_a_notice(served):
    _, client = served
    _, images, info = call(client, prompt="")
    assert len(images) == 1
    assert "The prompt is empty: the model sees ', best quality'" in info, info


def test_huge_and_rgb_uploads_are_downscaled_and_used_as_is(served, tmp_path):
    _, client = served
    wide = tmp_path / "wide.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 3000, 3), dtype=np.uint8)).save(wide)
    foreground, images, info = call(client, input_fg=wide)
    assert "The image (3000x64) was downscaled to 2048x44 (longest side limit 2048 px)." in info, info
    assert "has no alpha channel: the image is used as it is" in info, info
    assert Image.open(foreground).size == (2048, 44)
    assert len(images) == 1


def test_two_concurrent_requests_both_finish(served):
    from gradio_client import handle_file

    _, client = served
    args = {**FAST, "input_fg": handle_file(str(FOREGROUND))}
    jobs = [client.submit(*{**args, "seed": seed}.values(), api_name="/relight") for seed in (1, 2)]
    results = [job.result(timeout=120) for job in jobs]
    for _, gallery, info in results:
        assert len(gallery) == 1 and "UNet evaluations" in info
    a, b = (np.asarray(Image.open(r[1][0]["image"])) for r in results)
    assert not np.array_equal(a, b), "different seeds gave the same image"


def test_examples_come_from_bundled_data_and_fill_the_inputs(served):
    import db_examples
    from eddpm.settings import LIGHTING

    _, client = served
    rows = [json.loads(line) for line in open(db_examples.DATA_DIR / "metadata.jsonl")]
    assert len(db_examples.examples) == db_examples.NUM_EXAMPLES
    seen_lighting = set()
    for (path, prompt, lighting, width, height, seed), row in zip(db_examples.examples, rows):
        assert Path(path) == db_examples.DATA_DIR / row["conditioning_file_name"]
        assert Image.open(path).mode == "RGBA"
        assert prompt == row["text"]
        assert lighting in LIGHTING and (lighting == "None") == (row["light_direction"] == "front")
        assert lighting == "None" or lighting.lower() == row["light_direction"]
        assert width % 64 == 0 and height % 64 == 0 and 256 <= min(width, height) and isinstance(seed, int)
        seen_lighting.add(lighting)
    assert seen_lighting == set(LIGHTING)
    # Clicking example 3 is this call: the inputs are set to its values.
    updates = client.predict(3, api_name="/load_example")
    path, prompt, lighting, width, height, seed = db_examples.examples[3]
    values = [u["value"] for u in updates]
    assert Path(values[0]).name == Path(path).name
    assert values[1:] == [prompt, lighting, width, height, seed]


# ---------------------------------------------------------------------------------------------------
# relight.py
# ---------------------------------------------------------------------------------------------------


def run_relight(*args, timeout=180):
    return subprocess.run([sys.executable, "relight.py", *map(str, args)], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def test_relight_cli_end_to_end(tiny_output_dir, tmp_path):
    out = run_relight("--checkpoint", tiny_output_dir, "--input", FOREGROUND, "--prompt", "neon light, city",
                      "--output", tmp_path / "relit.png", "--width", 64, "--height", 128, "--steps", 4,
                      "--lighting", "Left", "--seed", 3, "--foreground_output", tmp_path / "fg.png")
    assert out.returncode == 0, out.stderr
    relit = np.asarray(Image.open(tmp_path / "relit.png"))
    assert relit.shape == (192, 128, 3)  # (128, 64) x 1.5 rounded to multiples of 64
    assert relit.std() > 0
    assert Image.open(tmp_path / "fg.png").size == (128, 128)
    calls = expected_unet_calls("eddpm", 4, "Left", 0.9, 0.5)
    assert f"sampler eddpm: {calls} UNet calls per image" in out.stdout, out.stdout
    assert " s per image" in out.stdout


def test_relight_cli_bad_input_exits_with_one_line(tiny_output_dir, tmp_path):
    out = run_relight("--checkpoint", tiny_output_dir, "--input", tmp_path / "missing.png", "--output",
                      tmp_path / "out.png", timeout=60)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == ["relight.py: error: missing file: missing.png not found"]


@pytest.mark.parametrize("case", ["not_an_image", "size", "incomplete_checkpoint", "eddpm_without_checkpoint",
                                  "eddpm_ddim_without_checkpoint", "output_extension", "no_input"])
def test_relight_cli_refuses_bad_input(case, tiny_output_dir, tmp_path, capsys):
    import relight

    text_file = tmp_path / "notes.png"
    text_file.write_text("hello")
    incomplete = tmp_path / "incomplete"
    (incomplete / "unet").mkdir(parents=True)
    (incomplete / "config.json").write_text("{}")
    base = ["--checkpoint", str(tiny_output_dir), "--input", str(FOREGROUND), "--output", str(tmp_path / "o.png")]
    argv, expected = {
        "not_an_image": (base[:2] + ["--input", str(text_file), "--output", str(tmp_path / "o.png")],
                         "unreadable image: notes.png"),
        "size": (base + ["--width", "100"], "multiples of 64"),
        "incomplete_checkpoint": (["--checkpoint", str(incomplete)] + base[2:],
                                  "missing unet/config.json, unet/diffusion_pytorch_model.safetensors"),
        "eddpm_without_checkpoint": (["--preset", "tiny", "--sampler", "eddpm"] + base[2:], "needs --checkpoint"),
        "eddpm_ddim_without_checkpoint": (["--preset", "tiny", "--sampler", "eddpm_ddim"] + base[2:],
                                          "--sampler eddpm_ddim needs --checkpoint"),
        "output_extension": (base[:4] + ["--output", str(tmp_path / "o.txt2")], "unknown image file extension"),
        "no_input": (["--preset", "tiny"], "--input and --output are required"),
    }[case]
    assert relight.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("relight.py: error: ") and expected in err[0], err


def test_relight_cli_empty_prompt_and_benchmark(tiny_output_dir, tmp_path, capsys):
    import relight

    assert relight.main(["--checkpoint", str(tiny_output_dir), "--input", str(FOREGROUND), "--output",
                         str(tmp_path / "o.png"), "--width", "64", "--height", "64", "--num_images", "2",
                         "--steps", "2", "--highres_scale", "1"]) == 0
    out = capsys.readouterr().out
    assert "The prompt is empty: the model sees ', best quality'" in out
    calls = expected_unet_calls("eddpm", 2, "None", 0.9, 0.5)  # the second pass runs at scale 1 too
    assert f"sampler eddpm: {calls} UNet calls per image (passes [2, " in out, out
    assert Image.open(tmp_path / "o-0.png").size == (64, 64) and (tmp_path / "o-1.png").is_file()
    assert relight.main(["--checkpoint", str(tiny_output_dir), "--benchmark", "--repeats", "1", "--width", "64",
                         "--height", "64", "--steps", "2"]) == 0
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(SAMPLER_KEYS), table  # the header, then one row per sampler
    assert table[1].startswith(f"| EDDPM (learned steps) | {expected_unet_calls('eddpm', 2, 'None', 0.9, 0.5)} (")


@pytest.mark.slow
def test_relight_on_a_real_train_py_output(tmp_path):
    """train.py --preset tiny (a few steps), then relight.py on its output folder: the formats agree."""
    out_dir = tmp_path / "run"
    train = subprocess.run([sys.executable, "train.py", "--preset", "tiny", "--output_dir", out_dir,
                            "--max_train_steps", "6", "--report_to", "none", "--cache_dir", tmp_path / "cache"],
                           cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert train.returncode == 0, train.stderr[-3000:]
    out = run_relight("--checkpoint", out_dir, "--input", FOREGROUND, "--output", tmp_path / "o.png",
                      "--width", 64, "--height", 64)
    assert out.returncode == 0, out.stderr
    assert "sampler eddpm" in out.stdout and Image.open(tmp_path / "o.png").size == (128, 128)
