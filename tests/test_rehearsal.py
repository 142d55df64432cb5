"""The real preset at the real size, rehearsed with random weights (slow: about 20 minutes, up to 16 GB).

scripts/make_random_sd15.py writes SD1.5-size models laid out as download_models.py leaves them; then, from a
working directory outside the repository, exactly what a new user runs: `train.py --preset iclight` with the
preset's defaults (only the data, the size, the step count and the checkpoint interval given), a resumed run,
relight.py and the Gradio demo on the base models and on the output folder. The peak RSS of each process and
the seconds it took are printed (pytest -s) and the training runs must stay within 18 GB (README "Memory").
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from PIL import Image

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
SYNTHETIC = REPO / "data" / "synthetic"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
MAX_TRAIN_RSS = 18e9  # issue 12: the preset at 256 px on a 24 GB machine within 18 GB
RESOLUTION = 128  # buckets (64, 256), (128, 128), (256, 64): the data below fills two of them
# The known-harmless messages eddpm/quiet.py drops; none may reach a user's terminal.
NOISE = ("should be kept in float32", "requires torchvision", "gemm_4bit_forward")


def run(name: str, command: list, cwd: Path, timeout: float, log: dict) -> subprocess.CompletedProcess:
    """Run `command` to the end; record its seconds and peak RSS (wait4's rusage of that child) in `log`."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen([str(c) for c in command], cwd=cwd, env=ENV, stdout=out, stderr=err)
        start = time.perf_counter()
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - start > timeout:
                proc.kill()
                _, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.5)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        done = subprocess.CompletedProcess(command, proc.returncode, out.read().decode(), err.read().decode())
    log[name] = {"seconds": round(time.perf_counter() - start, 1), "peak_rss_gb": round(usage.ru_maxrss / 1e6, 2)}
    print(f"rehearsal: {name}: {log[name]['seconds']} s, peak RSS {log[name]['peak_rss_gb']} GB", flush=True)
    assert done.returncode == 0, f"{name} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    noise = [line for line in done.stderr.splitlines() if any(n in line for n in NOISE)]
    assert not noise, f"{name} printed known-harmless warnings: {noise}"
    return done


def make_data(folder: Path) -> Path:
    """Four rows in two buckets at 128 px: two square paired rows, a wide paired row, and a wide unpaired
    RGB row, whose matte therefore comes from BriaRMBG."""
    rows = [json.loads(line) for line in (SYNTHETIC / "metadata.jsonl").read_text().splitlines()[:4]]
    out = []
    for i, row in enumerate(rows):
        target, condition = (Image.open(SYNTHETIC / row[k]) for k in ("file_name", "conditioning_file_name"))
        if i >= 2:  # wide: 256 x 64
            target, condition = target.resize((256, 64)), condition.resize((256, 64))
        (folder / "target").mkdir(parents=True, exist_ok=True)
        (folder / "condition").mkdir(exist_ok=True)
        target.convert("RGB").save(folder / f"target/{i}.png")
        entry = {"file_name": f"target/{i}.png", "text": row["text"]}
        if i < 3:
            condition.save(folder / f"condition/{i}.png")  # RGBA: its alpha is the matte
            entry["conditioning_file_name"] = f"condition/{i}.png"
        out.append(json.dumps(entry))
    (folder / "metadata.jsonl").write_text("\n".join(out) + "\n")
    return folder


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def demo_relights(name: str, model_args: list, cwd: Path, log: dict) -> None:
    """gradio_demo.py started from `cwd`, one "Relight" at 64 px through gradio_client, then stopped."""
    from gradio_client import Client, handle_file

    port = free_port()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen([sys.executable, REPO / "gradio_demo.py", *model_args, "--port", str(port)],
                                cwd=cwd, env=ENV, stdout=subprocess.DEVNULL, stderr=err)
        start = time.perf_counter()
        try:
            client = None
            while client is None:
                assert proc.poll() is None, f"{name} exited ({proc.returncode})"
                assert time.perf_counter() - start < 900, f"{name} did not start in 900 s"
                try:
                    client = Client(f"http://127.0.0.1:{port}/", verbose=False)
                except Exception:  # not listening yet
                    time.sleep(2)
            foreground, gallery, info = client.predict(
                handle_file(str(SYNTHETIC / "condition" / "00001.png")), "sunset over sea", 64, 64, 1, 7, 2,
                "best quality", "lowres", 2.0, 1.0, 0.5, 0.9, "Left", None, api_name="/relight")
            assert len(gallery) == 1 and Image.open(gallery[0]["image"]).size == (64, 64), info
        finally:
            proc.terminate()
            _, _, usage = os.wait4(proc.pid, 0)
            proc.returncode = 0
            err.seek(0)
            stderr = err.read().decode()
    log[name] = {"seconds": round(time.perf_counter() - start, 1), "peak_rss_gb": round(usage.ru_maxrss / 1e6, 2)}
    print(f"rehearsal: {name}: {log[name]['seconds']} s, peak RSS {log[name]['peak_rss_gb']} GB", flush=True)
    noise = [line for line in stderr.splitlines() if any(n in line for n in NOISE)]
    assert not noise, f"{name} printed known-harmless warnings: {noise}"


def test_the_iclight_preset_at_real_size_from_another_folder(tmp_path):
    log: dict = {}
    start = time.perf_counter()
    models, elsewhere = tmp_path / "models", tmp_path / "elsewhere"
    elsewhere.mkdir()
    made = run("make_random_sd15", [sys.executable, REPO / "scripts" / "make_random_sd15.py", "--models_dir", models],
               elsewhere, 1200, log)
    print(made.stdout.strip())
    base = models / "realistic-vision-v51"
    model_flags = ["--base_model", base, "--offset_path", models / "iclight_sd15_fc.safetensors",
                   "--rmbg_path", models / "RMBG-1.4"]
    data = make_data(tmp_path / "data")
    # paths relative to the working directory, as a user types them
    train = [sys.executable, REPO / "train.py", "--preset", "iclight", *model_flags, "--data_dir", "../data",
             "--output_dir", "out", "--cache_dir", "../cache", "--resolution", RESOLUTION, "--checkpointing_steps", 2]

    first = run("train.py, 2 steps", [*train, "--max_train_steps", 2], elsewhere, 3600, log)
    out = elsewhere / "out"
    config = json.loads((out / "config.json").read_text())
    assert config["data_dir"] == str(data) and config["output_dir"] == str(out)
    assert (config["train_batch_size"], config["gradient_accumulation_steps"], config["use_8bit_adam"],
            config["offload_ema"], config["gradient_checkpointing"], config["use_ema"]) == (1, 16, True, True, True, True)
    assert "4 rows usable, 0 skipped" in first.stdout + first.stderr
    assert (out / "checkpoint-2" / "manifest.json").is_file()
    assert log["train.py, 2 steps"]["peak_rss_gb"] * 1e9 <= MAX_TRAIN_RSS

    resumed = run("train.py, resumed for step 3", [*train, "--max_train_steps", 3, "--resume_from_checkpoint", "latest"],
                  elsewhere, 3600, log)
    assert "resumed from" in resumed.stdout + resumed.stderr
    stats = [json.loads(line) for line in (out / "stats.jsonl").read_text().splitlines()]
    assert [r["step"] for r in stats][-1] == 3
    for name in ("unet/config.json", "unet/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json",
                 "iclight_offsets.safetensors", "samples/step-000003.png"):
        assert (out / name).is_file(), name
    assert log["train.py, resumed for step 3"]["peak_rss_gb"] * 1e9 <= MAX_TRAIN_RSS
    for folder in (out / "checkpoint-2", out / "unet", out):  # the sizes README "Memory" quotes
        sizes = {p.name: p.stat().st_size for p in folder.iterdir() if p.is_file()}
        print(f"rehearsal: {folder.name}/: {sum(sizes.values()) / 1e9:.2f} GB {sizes}")

    foreground = SYNTHETIC / "condition" / "00001.png"
    relight = [sys.executable, REPO / "relight.py", "--input", foreground, "--width", 64, "--height", 64,
               "--steps", 2, "--highres_scale", 1, "--prompt", "sunset over sea"]
    run("relight.py, base models", [*relight, *model_flags, "--output", "base.png"], elsewhere, 1200, log)
    run("relight.py, output folder", [*relight, "--checkpoint", "out", "--rmbg_path", models / "RMBG-1.4",
                                      "--output", "trained.png"], elsewhere, 1200, log)
    assert Image.open(elsewhere / "base.png").size == Image.open(elsewhere / "trained.png").size == (64, 64)

    demo_relights("gradio_demo.py, base models", model_flags, elsewhere, log)
    demo_relights("gradio_demo.py, output folder", ["--checkpoint", "out", "--rmbg_path", models / "RMBG-1.4"],
                  elsewhere, log)
    print(f"rehearsal: total {time.perf_counter() - start:.0f} s; " + json.dumps(log))
