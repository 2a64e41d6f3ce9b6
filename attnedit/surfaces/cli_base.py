"""The command line's plumbing: one-line argparse errors, quiet libraries, option spellings, writing outputs.

Imports nothing heavy: ``attnedit --help`` and argument errors must not wait for torch.
"""

from __future__ import annotations

import argparse
from pathlib import Path


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``attnedit generate: error: argument --width: ...``), exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# Loggers whose warnings are about the libraries' own internals, not about the user's input or results.
QUIET_LOGGERS = ("torchao", "torch.utils._pytree", "diffusers.quantizers", "transformers.utils.import_utils")


def quiet_libraries() -> None:
    """Keep library chatter that is not the user's business off the terminal: deprecation and future warnings from
    library internals, transformers' advisory logging ('requires torchvision; falling back'), optional-backend
    notes (torchao's missing kernels, torch's pytree deprecations). diffusers' own warnings about a call (e.g. a
    frame count rounded) stay. Set TRANSFORMERS_VERBOSITY yourself to see transformers' again."""
    import logging
    import os
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    for category in (DeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"huggingface_hub\.")  # deprecated hub options
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


FLAGS = {"guidance_scale": "--guidance", "negative_prompt": "--negative", "layers": "--layer", "radial": "--dense",
         "mask": "--mask", "prompt": "prompt", "image": "image", "operation": "operation"}


def flag(name: str) -> str:
    """How the command line spells a task parameter, so its errors name the option the user typed."""
    return FLAGS.get(name, "--" + name.replace("_", "-"))


def save_outputs(out: Path, images: list, record: dict, video: bool, frames: bool, fps: int) -> None:
    """Write the outputs, each atomically; interrupted or failed half-way, none is left under its final name.
    A video is ``out`` (+ PNG frames in a folder beside it); one image is ``out``; several, a folder of PNGs."""
    from attnedit.surfaces.outputs import save_mp4, save_png

    numbered = [(out.with_suffix("") if video else out) / f"{i:04d}.png" for i in range(len(images))]
    if video:
        paths = [out] + (numbered if frames else [])
    else:
        paths = [out] if len(images) == 1 else numbered
    try:
        if video:
            save_mp4(out, images, fps)
        for path, image in zip(paths[1:] if video else paths, images):
            save_png(path, image, record)
    except BaseException:
        for path in paths:
            path.unlink(missing_ok=True)
        raise
