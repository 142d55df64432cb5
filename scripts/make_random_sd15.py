"""Write random-weight models of the real sizes in exactly the layout `download_models.py` produces.

    python scripts/make_random_sd15.py --models_dir /tmp/models   # about 4 GB on disk, 1-3 minutes, 4 GB RAM

For rehearsing the real preset without the real weights (tests/test_rehearsal.py; README "Memory"):

    MODELS_DIR/realistic-vision-v51/   model_index.json, unet/, vae/, text_encoder/ (float16 safetensors, as
                                        the base repository stores them), tokenizer/, scheduler/
    MODELS_DIR/iclight_sd15_fc.safetensors   686 float16 offsets, one per key of the 8-channel UNet
    MODELS_DIR/RMBG-1.4/               config.json and model.safetensors (BriaRMBG, float32)

The architectures are SD1.5's published configs (eddpm/sd15.py; sizes in docs/real-size.md). The tokenizer is
CLIP's real one when its vocabulary can be had: the file `bpe_simple_vocab_16e6.txt.gz` ships inside the
open-clip-torch wheel, so the script runs `pip download --no-deps open-clip-torch` into a temporary folder and
reads only that file (installing open-clip-torch would pull torchvision, which breaks diffusers here), or reads
`--clip_vocab` if given. Without it, a stand-in tokenizer of the same size (49408 entries, byte-pair merges of
character pairs) is written, and the script says so. Weights are random (seeded): nothing relights, but every
loader, shape, byte count and memory figure is the real one.
"""

from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from eddpm import iclight, sd15  # noqa: E402

CLIP_VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
CLIP_NUM_MERGES = sd15.CLIP_VOCAB_SIZE - 2 * 256 - 2  # 48894: the vocabulary is bytes, bytes + "</w>", merges, 2
START, END = "<|startoftext|>", "<|endoftext|>"
OFFSET_STD = 1e-3  # the random IC-Light offsets: small, as deltas from a base are


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) reversible map of the 256 byte values to printable characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes, extra = printable[:], 0
    byte_values = printable[:]
    for b in range(256):
        if b not in printable:
            byte_values.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(byte_values, map(chr, codes)))


def clip_merges_from_vocab_file(path: Path) -> list[tuple[str, str]]:
    """The first 48894 merges of open_clip's bpe file (after its header line), as CLIP's tokenizer takes them."""
    lines = gzip.open(path, "rt", encoding="utf-8").read().split("\n")
    return [tuple(line.split()) for line in lines[1:CLIP_NUM_MERGES + 1]]


def stand_in_merges() -> list[tuple[str, str]]:
    """48894 merges of two symbols into a new two-character token (letters first): a tokenizer of CLIP's size."""
    symbols = list(bytes_to_unicode().values())
    symbols.sort(key=lambda c: (not c.isalpha(), not c.islower(), c))
    merges = [(a, b + end) for end in ("</w>", "") for a in symbols for b in symbols]
    return merges[:CLIP_NUM_MERGES]


def fetch_clip_vocab(folder: Path) -> Path | None:
    """open_clip's bpe vocabulary from the open-clip-torch wheel (downloaded, never installed), or None."""
    try:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                        "open-clip-torch", "-d", str(folder)], check=True, capture_output=True, timeout=180)
    except (subprocess.SubprocessError, OSError):
        return None
    for wheel in folder.glob("open_clip_torch-*.whl"):
        with zipfile.ZipFile(wheel) as archive:
            name = f"open_clip/{CLIP_VOCAB_FILE}"
            if name in archive.namelist():
                target = folder / CLIP_VOCAB_FILE
                target.write_bytes(archive.read(name))
                return target
    return None


def write_tokenizer(folder: Path, merges: list[tuple[str, str]]) -> None:
    """vocab.json, merges.txt and the two small configs of an SD1.5 tokenizer/ folder (CLIPTokenizer)."""
    symbols = list(bytes_to_unicode().values())
    vocab = [*symbols, *(s + "</w>" for s in symbols), *("".join(m) for m in merges), START, END]
    if len(vocab) != sd15.CLIP_VOCAB_SIZE or len(set(vocab)) != len(vocab):
        raise ValueError(f"tokenizer vocabulary has {len(set(vocab))} distinct entries, expected {sd15.CLIP_VOCAB_SIZE}")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    special = {"bos_token": START, "eos_token": END, "unk_token": END, "pad_token": END}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    config = {**special, "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
              "errors": "replace", "add_prefix_space": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def write_base(base_dir: Path, seed: int, merges: list[tuple[str, str]]):
    """The base SD1.5 folder; returns the UNet (float16) for the offsets."""
    import diffusers
    import torch
    from diffusers import PNDMScheduler

    base_dir.mkdir(parents=True, exist_ok=True)
    write_tokenizer(base_dir / "tokenizer", merges)
    (base_dir / "scheduler").mkdir(exist_ok=True)  # written as the hub file is: clip_sample is not PNDM's
    scheduler = {"_class_name": PNDMScheduler.__name__, "_diffusers_version": diffusers.__version__,
                 **sd15.PNDM_SCHEDULER_CONFIG}
    (base_dir / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
    sd15.build_text_encoder(seed + 2).to(torch.float16).save_pretrained(base_dir / "text_encoder")
    sd15.build_vae(seed + 1).to(torch.float16).save_pretrained(base_dir / "vae")
    unet = sd15.build_unet(iclight.LATENT_CHANNELS, seed).to(torch.float16)
    unet.save_pretrained(base_dir / "unet")
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
             "feature_extractor": [None, None], "requires_safety_checker": False, "safety_checker": [None, None],
             "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"]}
    (base_dir / "model_index.json").write_text(json.dumps(index, indent=2))
    return unet


def write_offsets(path: Path, base_unet, seed: int) -> None:
    """One float16 offset per key of the 8-channel UNet (conv_in.weight at [320, 8, 3, 3]), like IC-Light's file."""
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed + 3)
    offsets = {}
    for key, weight in base_unet.state_dict().items():
        shape = list(weight.shape)
        if key == "conv_in.weight":
            shape[1] = iclight.LATENT_CHANNELS + iclight.CONDITION_CHANNELS
        offsets[key] = (torch.randn(shape, generator=generator) * OFFSET_STD).to(torch.float16)
    save_file(offsets, str(path))


def write_rmbg(folder: Path, seed: int) -> None:
    """config.json ({"in_ch": 3, "out_ch": 1}) and model.safetensors of a random BriaRMBG."""
    import torch

    from eddpm.briarmbg import BriaRMBG

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 4)
        BriaRMBG().save_pretrained(folder)
    (folder / "README.md").unlink(missing_ok=True)  # the hub mixin's model card: not part of the download


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models_dir", type=Path, required=True, help="Folder to write models into.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clip_vocab", type=Path, default=None,
                        help=f"open_clip's {CLIP_VOCAB_FILE} (default: taken from the open-clip-torch wheel).")
    parser.add_argument("--no_download", action="store_true", help="Do not fetch the wheel: stand-in tokenizer.")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        vocab = args.clip_vocab or (None if args.no_download else fetch_clip_vocab(Path(tmp)))
        if vocab is not None:
            merges, tokenizer_note = clip_merges_from_vocab_file(vocab), f"CLIP's vocabulary ({CLIP_VOCAB_FILE})"
        else:
            merges, tokenizer_note = stand_in_merges(), "a stand-in of CLIP's size (CLIP's vocabulary not found)"
    models = args.models_dir
    unet = write_base(models / iclight.DEFAULT_BASE_DIR.name, args.seed, merges)
    write_offsets(models / iclight.ICLIGHT_FC_FILENAME, unet, args.seed)
    del unet
    write_rmbg(models / iclight.DEFAULT_RMBG_DIR.name, args.seed)
    files = sorted(p for p in models.rglob("*") if p.is_file())
    total = sum(p.stat().st_size for p in files)
    print(f"make_random_sd15.py: wrote {len(files)} files, {total / 1e9:.2f} GB, into {models} in "
          f"{time.perf_counter() - start:.0f} s; tokenizer: {tokenizer_note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
