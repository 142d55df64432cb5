"""Shared fixtures. Tests never touch the network: the Hub is offline and Gradio sends no analytics."""

import os
import sys
from pathlib import Path

# Before anything imports huggingface_hub / gradio: offline hub lookups fail in 0.07 s instead of 23 s.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_components():
    """Tiny real-class IC-Light components (8-channel UNet, VAE, CLIP); shared, so never modify them."""
    from eddpm.tiny import build_tiny_components

    return build_tiny_components(seed=0)
