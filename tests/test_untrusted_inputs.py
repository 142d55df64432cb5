"""Issue 13's probes, run again: what a downloaded checkpoint, offset file, image or demo request may not do,
and how train.py, relight.py and gradio_demo.py end on an expected failure: status != 0, one line, no traceback
(an unexpected error keeps its traceback).

The dataset probes (paths leading out of the folder, deep nesting, a file of garbage) are in
tests/test_metadata.py; damaged checkpoints, the manifest, a full disk, a torn stats line and the output lock in
tests/test_checkpoint.py and tests/test_train.py; NaN offsets at the merge in tests/test_weights.py.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from test_train import run_train

REPO = Path(__file__).resolve().parents[1]
FOREGROUND = REPO / "data" / "synthetic" / "condition" / "00001.png"  # RGBA, 128 x 128
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "1"}

pytestmark = [  # third-party noise: diffusers' schedulers on numpy 2, gradio's modules
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning:gradio.*"),
    pytest.mark.filterwarnings("ignore::FutureWarning:gradio.*"),
]


def run_script(*args, timeout=240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


PROGRESS_BAR = re.compile(r".*\[\d\d:\d\d.*(/s|s/\w+)\]$")  # tqdm's "[00:01<00:02, 3.2it/s]" ending


def one_error_line(stderr: str, prefix: str) -> str:
    """The single line of an expected failure; progress bars (model loading, the cache) are not counted."""
    assert "Traceback" not in stderr, stderr
    lines = [re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", line).split("\r")[-1] for line in stderr.splitlines()]
    lines = [line for line in lines if line.strip() and not PROGRESS_BAR.match(line)]
    assert len(lines) == 1 and lines[0].startswith(prefix), stderr
    return lines[0]



def tiny_train_args(data_dir, tmp_path, *extra) -> list[str]:
    return ["--preset", "tiny", "--data_dir", str(data_dir), "--cache_dir", str(tmp_path / "cache"),
            "--output_dir", str(tmp_path / "out"), "--report_to", "none", "--max_train_steps", "1",
            "--num_threads", "1", *map(str, extra)]


@pytest.fixture(scope="module")
def base_with_damaged_offsets(tmp_path_factory, tiny_components):
    """A tiny diffusers base folder and an offset file for it holding a NaN and an Inf (IC-Light's layout)."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    from eddpm.tiny import TINY_UNET_CONFIG
    from eddpm.weights import widen_conv_in

    root = tmp_path_factory.mktemp("tiny-base")
    base = UNet2DConditionModel(**TINY_UNET_CONFIG)
    base.save_pretrained(root / "unet")
    for name in ("vae", "text_encoder", "tokenizer"):
        getattr(tiny_components, name).save_pretrained(root / name)
    offsets = {k: torch.zeros_like(v, dtype=torch.float16) for k, v in widen_conv_in(base).state_dict().items()}
    offsets["mid_block.resnets.0.conv1.weight"].view(-1)[3] = float("nan")
    offsets["conv_out.bias"][0] = float("inf")
    path = root / "iclight_damaged.safetensors"
    save_file(offsets, str(path))
    return root, path


# --- a crafted pickle is never run -------------------------------------------------------------------------


class _WritesMarker:
    """Unpickling this calls open(marker, "w"): the file appears if, and only if, the pickle is loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_a_crafted_pickle_in_a_checkpoint_never_runs(tmp_path):
    from eddpm import checkpoint as ckpt

    proof = tmp_path / "proof-the-payload-works"
    pickle.loads(pickle.dumps(_WritesMarker(proof)))
    assert proof.exists(), "the payload must run when unpickled, or this test proves nothing"

    marker = tmp_path / "pickle-ran"
    payload = pickle.dumps(_WritesMarker(marker))
    ckpt.write_state(str(tmp_path / "checkpoint-2"), {"counters": {"global_step": 2}})
    ckpt.write_state(str(tmp_path / "checkpoint-4"), {"counters": {"global_step": 4}})
    for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin"):
        (tmp_path / "checkpoint-4" / name).write_bytes(payload)  # where accelerate would put its pickles
    said = []
    assert ckpt.resolve_resume(str(tmp_path), "latest", say=said.append) == str(tmp_path / "checkpoint-2")
    assert "custom_checkpoint_0.pkl" in said[0] and "never loads pickles" in said[0], said
    with pytest.raises(ckpt.CheckpointError, match="custom_checkpoint_0.pkl"):
        ckpt.resolve_resume(str(tmp_path), str(tmp_path / "checkpoint-4"))
    assert ckpt.load_state(str(tmp_path / "checkpoint-2"))["counters"] == {"global_step": 2}
    assert not marker.exists(), "a pickle from the checkpoint folder was loaded"


def test_a_checkpoint_manifest_of_nested_brackets_is_skipped_by_name(tmp_path):
    from eddpm import checkpoint as ckpt

    for step in (2, 4):
        ckpt.write_state(str(tmp_path / f"checkpoint-{step}"), {"counters": {"global_step": step}})
    (tmp_path / "checkpoint-4" / "manifest.json").write_text("[" * 100_000)
    said = []
    assert ckpt.resolve_resume(str(tmp_path), "latest", say=said.append) == str(tmp_path / "checkpoint-2")
    assert len(said) == 1 and "checkpoint-4: unreadable manifest.json (RecursionError" in said[0], said


# --- train.py ------------------------------------------------------------------------------------------------


def test_train_missing_metadata_is_one_line_and_status_1(tmp_path):
    (tmp_path / "empty").mkdir()
    out = run_script("train.py", *tiny_train_args(tmp_path / "empty", tmp_path), timeout=300)
    assert out.returncode == 1, out
    line = one_error_line(out.stderr, "train.py: error: ")
    assert f"{tmp_path / 'empty' / 'metadata.jsonl'} not found: a dataset folder needs a metadata.jsonl" in line


@pytest.mark.parametrize("case", ["no usable rows", "strict", "outside", "missing weights", "damaged offsets"])
def test_train_expected_failures_end_with_one_line(case, tmp_path, base_with_damaged_offsets):
    base, damaged = base_with_damaged_offsets
    data = tmp_path / "data"
    data.mkdir()
    (data / "metadata.jsonl").write_text(json.dumps({"file_name": "../secret.png", "text": "t"}) + "\n" +
                                         json.dumps({"file_name": "absent.png", "text": "t"}) + "\n")
    (tmp_path / "secret.png").write_bytes(FOREGROUND.read_bytes())
    extra, expected = {
        "no usable rows": ([], "no usable rows"),
        "strict": (["--strict_data"], "metadata.jsonl:1: ../secret.png: outside the dataset folder: file_name "
                                      "'../secret.png' leads out of it"),
        "outside": (["--allow_outside_paths", "--strict_data"],  # line 1 is read now; line 2 stops the run
                    "metadata.jsonl:2: absent.png: missing file: file_name 'absent.png' not found"),
        "missing weights": (["--base_model", tmp_path / "nowhere"], "these files are missing"),
        "damaged offsets": (["--base_model", base, "--offset_path", damaged], "hold NaN or Inf values in 2 tensor"),
    }[case]
    with pytest.raises(SystemExit) as stop:
        run_train(tiny_train_args(data, tmp_path, *extra))
    message = str(stop.value.code)
    assert message.startswith("train.py: error: ") and expected in message and "\n" not in message, message


# --- relight.py ----------------------------------------------------------------------------------------------


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels (2 MB would hold 13000 x 13000 of one colour) but holds almost
    nothing: only the header is needed to refuse it."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def test_relight_missing_weights_is_one_line_and_status_2(tmp_path):
    out = run_script("relight.py", "--base_model", tmp_path / "nowhere", "--input", FOREGROUND, "--output",
                     tmp_path / "o.png", "--device", "cpu")
    assert out.returncode == 2, out
    line = one_error_line(out.stderr, "relight.py: error: ")
    assert str(tmp_path / "nowhere") in line and "download_models.py" in line, line


@pytest.mark.parametrize("case", ["damaged offsets", "13000x13000 png", "too many megapixels", "too much work",
                                  "long prompt", "unwritable output"])
def test_relight_refuses_with_one_line(case, tmp_path, capsys, base_with_damaged_offsets):
    import relight

    base, damaged = base_with_damaged_offsets
    (tmp_path / "huge.png").write_bytes(png_header(13000, 13000))
    (tmp_path / "a_file").write_text("")
    fast = ["--input", FOREGROUND, "--output", tmp_path / "o.png", "--device", "cpu", "--width", 64,
            "--height", 64, "--steps", 1]
    tiny = ["--preset", "tiny", *fast]
    argv, expected = {
        "damaged offsets": (["--base_model", base, "--offset_path", damaged, "--rmbg_path", tmp_path, *fast],
                            "hold NaN or Inf values in 2 tensor(s): conv_out.bias, mid_block.resnets.0.conv1.weight"),
        "13000x13000 png": (tiny + ["--input", tmp_path / "huge.png"], "too large: huge.png: 13000x13000"),
        "too many megapixels": (tiny + ["--width", 2048, "--height", 2048, "--highres_scale", 3],
                                "37.7 megapixels, more than the 2.5 accepted here"),
        "too much work": (tiny + ["--width", 512, "--height", 512, "--steps", 1000, "--highres_scale", 1],
                          "this request costs 524 megapixel-steps"),
        "long prompt": (tiny + ["--prompt", "x" * 50_000], "prompt has 50000 characters; at most 1000"),
        "unwritable output": (tiny + ["--output", tmp_path / "a_file" / "o.png"], "a_file"),
    }[case]
    assert relight.main(list(map(str, argv))) == 2
    line = one_error_line(capsys.readouterr().err, "relight.py: error: ")
    assert expected in line, line
    assert not (tmp_path / "o.png").exists()


def test_relight_limit_flags_raise_the_limits(tmp_path, capsys):
    import relight

    argv = ["--preset", "tiny", "--input", str(FOREGROUND), "--output", str(tmp_path / "o.png"), "--device", "cpu",
            "--width", "64", "--height", "64", "--steps", "2", "--num_images", "2"]
    assert relight.main(argv + ["--max_work", "0.01"]) == 2
    assert "--max_work raises the limit" in capsys.readouterr().err
    assert relight.main(argv + ["--max_megapixels", "0.01"]) == 2
    assert "--max_megapixels raises the limit" in capsys.readouterr().err
    assert relight.main(argv + ["--prompt", "light", "--max_prompt_chars", "3"]) == 2
    assert "prompt has 5 characters; at most 3" in capsys.readouterr().err
    assert relight.main(argv + ["--prompt", "light", "--max_prompt_chars", "100", "--max_work", "0.1"]) == 0


def test_relight_unexpected_errors_keep_their_traceback(tmp_path, monkeypatch):
    import relight
    from eddpm.relighting import Relighter

    def broken(self, foreground, settings):
        raise ValueError("an unexpected fault inside the pipeline")

    monkeypatch.setattr(Relighter, "_relight", broken)
    with pytest.raises(ValueError, match="unexpected fault inside the pipeline"):
        relight.main(["--preset", "tiny", "--input", str(FOREGROUND), "--output", str(tmp_path / "o.png"),
                      "--device", "cpu", "--width", "64", "--height", "64", "--steps", "1"])


# --- the request limits depend on the device ---------------------------------------------------------------


def test_request_limits_depend_on_the_device_and_count_images_steps_and_passes():
    from eddpm.settings import RelightSettings, SettingsError, check_settings, request_cost, request_limits

    default = RelightSettings(sampler="ddim")  # IC-Light's defaults: 512x640, then 768x960, 25 steps
    assert request_cost(default) == pytest.approx((25 * (512 * 640 + 768 * 960) / 1e6, 768 * 960 / 1e6))
    ui_max = RelightSettings(sampler="ddim", width=1024, height=1024, highres_scale=3.0, num_images=12, steps=100)
    assert request_cost(ui_max) == pytest.approx((12 * 100 * (1024**2 + 3072**2) / 1e6, 12 * 3072**2 / 1e6))
    single_pass = RelightSettings(sampler="ddim", highres_denoise=0)
    assert request_cost(single_pass) == pytest.approx((25 * 512 * 640 / 1e6, 512 * 640 / 1e6))

    cpu, cuda = request_limits("cpu"), request_limits("cuda")
    assert request_limits("mps") == cpu and cpu.max_work < cuda.max_work and cpu.max_megapixels < cuda.max_megapixels
    check_settings(default, limits=cpu)  # IC-Light's defaults run everywhere
    big = RelightSettings(sampler="ddim", width=1024, height=1024, highres_scale=3.0)  # the CPU probe: 20 minutes
    with pytest.raises(SettingsError, match="--max_megapixels"):
        check_settings(big, limits=cpu)
    check_settings(big, limits=cuda)
    with pytest.raises(SettingsError, match="--max_megapixels"):
        check_settings(ui_max, limits=cuda)
    check_settings(ui_max, limits=request_limits("cuda", max_work=1e6, max_megapixels=200))


# --- gradio_demo.py ------------------------------------------------------------------------------------------


def test_gradio_demo_missing_weights_is_one_line_and_status_2(tmp_path):
    out = run_script("gradio_demo.py", "--base_model", tmp_path / "nowhere", "--device", "cpu")
    assert out.returncode == 2, out
    line = one_error_line(out.stderr, "gradio_demo.py: error: ")
    assert str(tmp_path / "nowhere") in line and "download_models.py" in line, line


@pytest.fixture(scope="module")
def demo_relight():
    """The function behind the demo's Relight button (what its API calls), on the tiny models on the CPU."""
    import gradio_demo

    args = gradio_demo.build_parser().parse_args(["--preset", "tiny", "--device", "cpu"])
    relighter, matte_fn, notes = gradio_demo.load_models(args)
    demo = gradio_demo.build_demo(relighter, matte_fn, notes)
    fn = next(f.fn for f in demo.fns.values() if f.api_name == "relight")
    yield relighter, fn
    demo.close()


API = dict(input_fg={"path": str(FOREGROUND)}, prompt="sunset", image_width=64, image_height=64, num_samples=1,
           seed=7, steps=1, a_prompt="best quality", n_prompt="lowres", cfg=2.0, highres_scale=1.0,
           highres_denoise=0.5, lowres_denoise=0.9, bg_source="None", sampler="ddim")


@pytest.mark.parametrize("change, message", [
    (dict(image_width="abc"), "width must be a number, got 'abc'"),
    (dict(image_height=None), "height must be a number, got None"),
    (dict(num_samples=[3]), "num_images must be a number, got [3]"),
    (dict(cfg="2"), "guidance_scale must be a number, got '2'"),
    (dict(highres_scale=float("nan")), "highres_scale must be in [1, 3]"),
    (dict(steps=2.5), "steps must be a whole number, got 2.5"),
    (dict(prompt=12), "prompt must be text, got 12"),
    (dict(sampler="x" * 5000), "unknown sampler 'xxxxx"),
    (dict(image_width=2048, image_height=2048, highres_scale=3.0, num_samples=12), "--max_megapixels"),
    (dict(prompt="x" * 50_000), "prompt has 50000 characters"),
    (dict(input_fg={"path": "HUGE"}), "too large: huge.png: 13000x13000"),
])
def test_demo_requests_are_bounded_and_errors_name_the_field(change, message, demo_relight, tmp_path):
    import gradio as gr

    _, relight_fn = demo_relight
    huge = tmp_path / "huge.png"
    huge.write_bytes(png_header(13000, 13000))
    values = {**API, **change}
    if values["input_fg"] == {"path": "HUGE"}:
        values["input_fg"] = {"path": str(huge)}
    with pytest.raises(gr.Error) as err:
        relight_fn(*values.values())
    assert message in err.value.message and len(err.value.message) < 400, err.value.message


def test_demo_small_request_runs_and_an_unexpected_error_is_not_a_user_error(demo_relight, monkeypatch):
    import gradio as gr

    relighter, relight_fn = demo_relight
    foreground, images, info = relight_fn(*API.values())
    assert len(images) == 1 and images[0].shape == (64, 64, 3)

    def broken(self, foreground, settings):
        raise ValueError("an unexpected fault inside the pipeline")

    monkeypatch.setattr(type(relighter), "_relight", broken)
    with pytest.raises(ValueError, match="unexpected fault") as err:
        relight_fn(*API.values())
    assert not isinstance(err.value, gr.Error)


# --- the output folder's stats.jsonl -------------------------------------------------------------------------


def test_stats_lines_that_are_torn_garbage_or_deeply_nested_are_dropped(tmp_path):
    from eddpm.plots import read_stats

    path = tmp_path / "stats.jsonl"
    path.write_text('{"step": 1, "loss": 0.5}\n' + "[" * 100_000 + '\n"text"\n{"step": "2"}\n{"step": 3, "lo')
    assert read_stats(str(path)) == [{"step": 1, "loss": 0.5}]
