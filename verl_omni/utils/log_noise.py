"""Silence the log lines a CPU run prints that carry no information for this project, and nothing else.

Each entry names the logger and the start of the message, so a new warning from the same library still
shows. Installed when ``verl_omni`` is imported: a Ray worker imports the package of the overlay class it runs
before that class's module imports verl, whose import logs the first of them.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

# logger name -> message prefixes to drop
_KNOWN_NOISE: dict[str, tuple[str, ...]] = {
    # a CPU-only machine: verl falls back to its CUDA platform object, which the CPU path never uses
    "verl.plugin.platform.platform_manager": ("No supported accelerator detected", "Platform 'nvidia' (PlatformCUDA)"),
    # the image processors of optional SD3 components (never used here) fall back to PIL without torchvision
    "transformers.utils.import_utils": ("`SiglipImageProcessor` requires torchvision", "`CLIPImageProcessor` requires"),
    # diffusers tokenizes untruncated only to report truncation, which its own warning below does
    "transformers.tokenization_utils_base": ("Token indices sequence length is longer",),
}
# diffusers reports T5 truncation as the text past CLIP's length: with short prompts that list is empty
_EMPTY_TRUNCATION = "diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3"


class _DropByPrefix(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


class _DropEmptyTruncation(logging.Filter):
    """Drop "the following part of your input was truncated ...: ['', '']" when no text was removed."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.startswith("The following part of your input was truncated"):
            return True
        removed = message.rsplit(":", 1)[-1].strip()
        return removed.strip("[]").replace("'", "").replace(",", "").strip() != ""


def quiet_known_noise() -> None:
    """Install the filters (idempotent)."""
    loggers = dict(_KNOWN_NOISE)
    spec = importlib.util.find_spec("verl")  # a submodule's find_spec would import verl (seconds)
    if spec is not None and spec.submodule_search_locations:  # verl names this module's logger by its file path
        base = Path(next(iter(spec.submodule_search_locations))) / "single_controller" / "ray" / "base.py"
        loggers[str(base)] = ("Requested device cpu does not match",)
    for name, prefixes in loggers.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropByPrefix) for f in logger.filters):
            logger.addFilter(_DropByPrefix(prefixes))
    truncation = logging.getLogger(_EMPTY_TRUNCATION)
    if not any(isinstance(f, _DropEmptyTruncation) for f in truncation.filters):
        truncation.addFilter(_DropEmptyTruncation())
