"""Drop the known-harmless log messages that every run printed, and nothing else.

Each entry names one library logger and one message; a record of that logger whose text matches is dropped,
every other record of that logger (and of every other logger) passes. Filters sit on loggers, not handlers,
so installing them before the libraries are imported works, and installing them twice changes nothing.
eddpm/__init__.py installs them, so train.py, relight.py, gradio_demo.py, bench/ and the tests all get them.
"""

from __future__ import annotations

import logging
import re

# (logger name, message regex): why each is harmless.
KNOWN_HARMLESS = (
    # ModelMixin.to(dtype) warns on every cast, even when the list of modules to keep in float32 is empty,
    # as it is for the UNet, the VAE and the text encoder here. A non-empty list still shows.
    ("diffusers.models.modeling_utils",
     r"There are modules in \w+ that should be kept in float32: \[\]\."),
    # Importing diffusers' pipelines touches transformers' image processors (the safety checker's and
    # IP-Adapter's); without torchvision, which this project must not install (requirements.txt), transformers
    # falls back to the PIL processor, and nothing here preprocesses images with it.
    ("transformers.utils.import_utils",
     r"`\w+ImageProcessor` requires torchvision \(not installed\); falling back to `\w+ImageProcessorPil`"),
    # bitsandbytes (imported by diffusers whenever it is installed) looks for an optional 4-bit matmul kernel
    # from the Hub; this project uses only its 8-bit AdamW (train.py --use_8bit_adam).
    ("bitsandbytes.backends.cpu.ops", r"Failed to load CPU gemm_4bit_forward from kernels-community"),
)


class _DropMessage(logging.Filter):
    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.match(record.getMessage())


def install() -> None:
    """Add one filter per KNOWN_HARMLESS entry to its logger (idempotent)."""
    for name, pattern in KNOWN_HARMLESS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) and f.pattern.pattern == pattern for f in logger.filters):
            logger.addFilter(_DropMessage(pattern))
