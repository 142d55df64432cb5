"""A real browser opens the demo: headless Chromium renders `python gradio_demo.py --preset tiny`.

`--dump-dom` gives the DOM after Gradio's frontend has run; with the <script> blocks removed (they hold
the app config, which names every label whether or not anything rendered) the labels must be there as
rendered elements. The screenshot must not be blank. Flags that work headless (root needs
--no-sandbox; without --virtual-time-budget the page is still empty when the shot is taken).

Under CI (CI=true) a missing chromium fails the test; elsewhere it skips. To refresh the README's
screenshot: DEMO_SCREENSHOT=docs/demo.png pytest tests/test_browser.py
"""

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "1"}
WINDOW = (1280, 1500)  # tall enough to show the controls under the uploads


def chromium() -> str:
    path = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true but chromium is missing: .ci/run installs it with `apt-get install -y chromium`")
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    return path


def run_chromium(url: str, *flags: str) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run(
            [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", f"--window-size={WINDOW[0]},{WINDOW[1]}", "--hide-scrollbars",
             "--virtual-time-budget=8000", *flags, url],
            capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def demo_url():
    """`python gradio_demo.py --preset tiny` on a free port, as a user starts it; stopped afterwards."""
    chromium()  # skip or fail before starting the server
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen([sys.executable, "gradio_demo.py", "--preset", "tiny", "--port", str(port)], cwd=REPO,
                            env=ENV, stdout=log, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"gradio_demo.py exited with {proc.returncode}:\n{log.read()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("gradio_demo.py did not answer within 120 s")
            time.sleep(0.5)
        log.seek(0)
        assert f"Running on local URL:  http://127.0.0.1:{port}" in log.read(), "not bound to 127.0.0.1"
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_rendered_dom_has_the_controls(demo_url):
    out = run_chromium(demo_url, "--dump-dom")
    assert out.returncode == 0, out.stderr[-2000:]
    rendered = re.sub(r"<(script|style)\b.*?</\1>", "", out.stdout, flags=re.S)  # what the frontend built
    text = " ".join(re.sub(r"<[^>]+>", " ", rendered).split())
    for label in ("IC-Light relighting (fc) with EDDPM learned steps", "Foreground", "Drop Image Here",
                  "Extracted foreground (on gray)", "Prompt", "Lighting Preference (Initial Latent)",
                  "None Left Right Top Bottom", "Subject Quick List", "beautiful woman, detailed face",
                  "Lighting Quick List", "neon, Wong Kar-wai, warm", "Relight", "Sampler", "Images", "Seed",
                  "Image Width", "Image Height", "Advanced options", "Outputs",
                  "Elapsed time and UNet evaluations per image", "No background remover",
                  "Examples (bundled synthetic foregrounds", "gray sphere, neutral light from the left"):
        assert label in text, f"{label!r} is not on the rendered page:\n{text[:3000]}"
    assert 'data-testid="image"' in rendered and 'data-testid="textbox"' in rendered


def test_screenshot_shows_the_page(demo_url, tmp_path):
    shot = tmp_path / "demo.png"
    out = run_chromium(demo_url, f"--screenshot={shot}")
    assert out.returncode == 0 and shot.is_file(), out.stderr[-2000:]
    image = Image.open(shot)
    assert image.size == WINDOW
    gray = np.asarray(image.convert("L"), dtype=np.float64)
    # A blank page is one flat colour; the rendered demo has text, borders and an orange button.
    assert gray.std() > 8, f"pixel std {gray.std():.2f}: the page looks blank"
    assert len(np.unique(gray)) > 50, "too few gray levels for a rendered page"
    title = gray[:80, :700]  # the title's dark text in the top-left corner
    assert (title < 100).mean() > 0.01, "no title text in the top-left corner"
    rgb = np.asarray(image.convert("RGB"), dtype=np.int16)
    orange = (rgb[..., 0] > 200) & (rgb[..., 1] > 80) & (rgb[..., 1] < 160) & (rgb[..., 2] < 80)
    assert orange.sum() > 2000, "the primary Relight button is not visible"
    if os.environ.get("DEMO_SCREENSHOT"):
        target = REPO / os.environ["DEMO_SCREENSHOT"]
        target.parent.mkdir(parents=True, exist_ok=True)
        image.convert("RGB").quantize(colors=64).save(target, optimize=True)
