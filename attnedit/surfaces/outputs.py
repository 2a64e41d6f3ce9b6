"""Writing results so that no finished work is ever lost: atomic files, parameters embedded and beside.

Every image is a PNG with two text chunks: ``parameters`` (the AUTOMATIC1111 line format other tools read)
and ``attnedit`` (the full job as JSON). A JSON sidecar is written last; its presence marks the job done.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder and a rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; outputs should be readable like any other
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, value: Any) -> None:
    atomic_write_bytes(path, (json.dumps(value, indent=2, sort_keys=True, default=str) + "\n").encode())


def a1111_parameters(params: dict[str, Any]) -> str:
    """The ``parameters`` text of AUTOMATIC1111: prompt, negative prompt, then 'Key: value, ...'."""
    lines = [str(params.get("prompt", ""))]
    if params.get("negative_prompt"):
        lines.append(f"Negative prompt: {params['negative_prompt']}")
    fields = {
        "Steps": params.get("steps"), "CFG scale": params.get("guidance_scale"), "Seed": params.get("seed"),
        "Size": f"{params['width']}x{params['height']}" if params.get("width") and params.get("height") else None,
        "Model": params.get("model"),
    }
    lines.append(", ".join(f"{k}: {v}" for k, v in fields.items() if v is not None))
    return "\n".join(lines)


def save_png(path: Path, image: Image.Image, params: dict[str, Any]) -> None:
    """Atomically save ``image`` as PNG with the job's parameters in text chunks."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", a1111_parameters(params))
    info.add_text("attnedit", json.dumps(params, sort_keys=True, default=str))
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    atomic_write_bytes(path, buffer.getvalue())


def read_png_parameters(path: Path) -> dict[str, Any]:
    """The job JSON embedded by :func:`save_png`."""
    with Image.open(path) as image:
        return json.loads(image.text["attnedit"])


def save_mp4(path: Path, frames: list[Image.Image], fps: int = 16) -> None:
    """Atomically write H.264 MP4 (browser-playable, via diffusers' imageio export)."""
    import numpy as np
    from diffusers.utils import export_to_video

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp.mp4")
    os.close(fd)
    try:
        export_to_video([np.asarray(f, dtype=np.float32) / 255.0 for f in frames], tmp, fps=fps)
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
