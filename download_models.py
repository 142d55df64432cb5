"""Download the weights IC-Light fc training and the demo need into models/.

    python download_models.py                      # everything (several GB)
    python download_models.py --only iclight       # just iclight_sd15_fc.safetensors

What goes where (names in eddpm/iclight.py):
  base     stablediffusionapi/realistic-vision-v51 -> models/realistic-vision-v51
           (diffusers subfolders unet, vae, text_encoder, tokenizer, scheduler; safetensors only)
  iclight  lllyasviel/ic-light iclight_sd15_fc.safetensors -> models/iclight_sd15_fc.safetensors
  rmbg     briaai/RMBG-1.4 config.json + model.safetensors -> models/RMBG-1.4 (non-commercial licence)

Files already present are not downloaded again. Heavy imports happen inside main(), so --help is fast.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path
from urllib.parse import urlparse

# Kept in step with eddpm/iclight.py (not imported here so that --help does not import torch).
BASE_REPO = "stablediffusionapi/realistic-vision-v51"
ICLIGHT_REPO = "lllyasviel/ic-light"
ICLIGHT_FC_FILENAME = "iclight_sd15_fc.safetensors"
RMBG_REPO = "briaai/RMBG-1.4"

# Only the diffusers pieces we use, only safetensors weights (never pickled .bin/.ckpt), no fp16 copies.
BASE_PATTERNS = [
    "model_index.json",
    "scheduler/scheduler_config.json",
    "tokenizer/*",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "text_encoder/model.safetensors.index.json",
    "text_encoder/model-*.safetensors",
    *(
        f"{sub}/{name}"
        for sub in ("unet", "vae")
        for name in (
            "config.json",
            "diffusion_pytorch_model.safetensors",
            "diffusion_pytorch_model.safetensors.index.json",
            "diffusion_pytorch_model-*.safetensors",
        )
    ),
]
# Files that must exist after the base download (the loaders check the same ones).
BASE_REQUIRED = [
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
]
RMBG_FILES = ["config.json", "model.safetensors"]


class DownloadError(Exception):
    """A failure to report as one paragraph (no traceback)."""


def offline_message(reason: str) -> str:
    return (
        f"Cannot download the models: {reason}. download_models.py fetches several GB from the Hugging Face "
        "Hub (base SD1.5 model, IC-Light fc offsets, RMBG-1.4) into the models folder, so run it on a machine "
        "with internet access (unset HF_HUB_OFFLINE; set HTTPS_PROXY if you need a proxy), or copy an "
        "existing models/ folder here. Nothing was downloaded."
    )


def check_hub_reachable(timeout_s: float = 5.0) -> None:
    """Fail fast instead of letting huggingface_hub retry for about 25 s when there is no network."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise DownloadError(offline_message("HF_HUB_OFFLINE is set, so the Hub is not contacted"))
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return  # a proxy decides reachability; let huggingface_hub try through it
    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as err:
        raise DownloadError(offline_message(f"{host}:{port} is not reachable ({err})")) from None


def human_size(num_bytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if num_bytes < 1024 or unit == "GB":
            return f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    return ""


def report(paths: list[Path]) -> None:
    total = 0
    for path in paths:
        size = path.stat().st_size
        total += size
        print(f"  {human_size(size):>10}  {path}")
    print(f"  {human_size(total):>10}  total")


def download_base(models_dir: Path) -> list[Path]:
    from huggingface_hub import snapshot_download

    target = models_dir / "realistic-vision-v51"
    snapshot_download(BASE_REPO, local_dir=target, allow_patterns=BASE_PATTERNS)
    missing = [name for name in BASE_REQUIRED if not (target / name).is_file()]
    if missing:
        raise DownloadError(
            f"{BASE_REPO} was fetched into {target} but these safetensors files are missing: "
            f"{', '.join(missing)}. This script never downloads pickled .bin/.ckpt weights; convert them "
            "to safetensors yourself or pass another diffusers base to the loaders."
        )
    return sorted(p for p in target.rglob("*") if p.is_file() and ".cache" not in p.parts)


def download_iclight(models_dir: Path) -> list[Path]:
    from huggingface_hub import hf_hub_download

    return [Path(hf_hub_download(ICLIGHT_REPO, ICLIGHT_FC_FILENAME, local_dir=models_dir))]


def download_rmbg(models_dir: Path) -> list[Path]:
    from huggingface_hub import hf_hub_download

    target = models_dir / "RMBG-1.4"
    return [Path(hf_hub_download(RMBG_REPO, name, local_dir=target)) for name in RMBG_FILES]


DOWNLOADS = {
    "base": (BASE_REPO, download_base),
    "iclight": (ICLIGHT_REPO, download_iclight),
    "rmbg": (RMBG_REPO, download_rmbg),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models_dir", type=Path, default=Path("models"), help="Folder to download into.")
    parser.add_argument(
        "--only", choices=sorted(DOWNLOADS), action="append", help="Download only this part (repeatable)."
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check_hub_reachable()
    except DownloadError as err:
        print(f"download_models.py: {err}", file=sys.stderr)
        return 1
    from huggingface_hub.errors import GatedRepoError

    args.models_dir.mkdir(parents=True, exist_ok=True)
    for part in args.only or list(DOWNLOADS):
        repo, download = DOWNLOADS[part]
        print(f"[{part}] {repo} -> {args.models_dir}")
        try:
            report(download(args.models_dir))
        except KeyboardInterrupt:
            print("download_models.py: interrupted; run it again to resume.", file=sys.stderr)
            return 130
        except GatedRepoError:
            print(
                f"download_models.py: {repo} is gated: accept its terms at https://huggingface.co/{repo} and "
                "log in with `hf auth login` (or set HF_TOKEN), then run this again.",
                file=sys.stderr,
            )
            return 1
        except DownloadError as err:
            print(f"download_models.py: {err}", file=sys.stderr)
            return 1
        except Exception as err:  # network or hub failure: one paragraph, not a traceback
            reason = (
                f"{err.__class__.__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
            )
            print(
                f"download_models.py: downloading {part} ({repo}) failed: {reason}. Check the connection (or "
                "HTTPS_PROXY / HF_TOKEN) and run it again; files already in the models folder are kept and "
                "the next run resumes.",
                file=sys.stderr,
            )
            return 1
    print(f"Done. Weights are in {args.models_dir}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
