"""Reading clips and per-frame masks, writing results: the file side of :mod:`attnedit.pipelines.video_edit`.

A *video* is an MP4/WebM/MOV/GIF path, a folder of frame images (sorted by name), a uint8 ``(F, H, W, 3)`` array
(float in [0, 1] also), a tensor of that shape, or a list of frames. *Masks* are a mask video, a folder of masks,
an ``(F, H, W)`` array, a list of per-frame masks, or boxes: one ``(x0, y0, x1, y1)`` for every frame, or a list of
F boxes (a track; :func:`linear_track` draws one between a first and a last box). Every reader fails with one
ValueError naming the argument; nothing here writes except :func:`save_video`, which writes atomically.

>>> frames, fps = load_video("clip.mp4")                              # (F, H, W, 3) uint8, frames per second  # doctest: +SKIP
>>> masks = load_masks("masks/", frames.shape[0], frames.shape[1:3])  # bool (F, H, W)  # doctest: +SKIP
>>> save_video(frames, "copy.mp4", fps)                              # doctest: +SKIP
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageSequence

from attnedit.methods.key_masking import box_mask, load_mask

VideoLike = str | os.PathLike | np.ndarray | torch.Tensor | list
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".gif")
DEFAULT_FPS = 16.0  # Wan's frame rate, for arrays and folders that carry none

__all__ = ["DEFAULT_FPS", "linear_track", "load_masks", "load_video", "save_video"]


def _frames_array(frames: Any, name: str) -> np.ndarray:
    """(F, H, W, 3) uint8 from an array, tensor or list of frames (uint8, or float in [0, 1])."""
    if isinstance(frames, list):
        if not frames:
            raise ValueError(f"{name}=[] has no frames")
        frames = np.stack([np.asarray(f.convert("RGB")) if isinstance(f, Image.Image) else np.asarray(f) for f in frames])
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu().numpy()
    array = np.asarray(frames)
    if array.ndim == 3:  # grey frames
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.ndim != 4 or array.shape[-1] not in (3, 4) or array.shape[0] < 1:
        raise ValueError(f"{name} has shape {array.shape}; expected (frames, height, width, 3)")
    array = array[..., :3]
    if array.dtype != np.uint8:
        if array.dtype.kind not in "fiu" or array.min(initial=0) < 0 or array.max(initial=0) > (1 if array.dtype.kind == "f" else 255):
            raise ValueError(f"{name} of dtype {array.dtype} must be uint8, or float in [0, 1]")
        array = np.round(array * 255).astype(np.uint8) if array.dtype.kind == "f" else array.astype(np.uint8)
    return np.ascontiguousarray(array)


def _folder(path: Path, name: str) -> list[Path]:
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{name}={str(path)!r} is a folder with no frame images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def _read_file(path: Path, name: str) -> tuple[np.ndarray, float]:
    """Frames and fps of a GIF (PIL) or a video file (imageio's ffmpeg)."""
    try:
        if path.suffix.lower() == ".gif":
            with Image.open(path) as image:
                frames = [np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(image)]
                duration = image.info.get("duration") or 1000 / DEFAULT_FPS
            return np.stack(frames), 1000.0 / float(duration)
        import imageio.v2 as imageio

        with imageio.get_reader(str(path), format="FFMPEG") as reader:
            fps = float(reader.get_meta_data().get("fps") or DEFAULT_FPS)
            frames = [np.asarray(f) for f in reader]
        if not frames:
            raise ValueError("no frames decoded")
        return np.stack(frames), fps
    except Exception as error:  # noqa: BLE001 - every decoder failure is the same user error
        raise ValueError(f"{name}={str(path)!r} cannot be read as a video: {error}") from None


def load_video(video: VideoLike, name: str = "video") -> tuple[np.ndarray, float]:
    """``(frames (F, H, W, 3) uint8, fps)`` of a path (video file, GIF, folder of frames), array, tensor or list."""
    if isinstance(video, (str, os.PathLike)):
        path = Path(video)
        if path.is_dir():
            return _frames_array([_open_image(p, name) for p in _folder(path, name)], name), DEFAULT_FPS
        if not path.is_file():
            raise ValueError(f"{name}={str(path)!r} does not exist")
        if path.suffix.lower() in IMAGE_SUFFIXES:
            raise ValueError(f"{name}={str(path)!r} is a single image; give a video, a GIF or a folder of frames")
        frames, fps = _read_file(path, name)
        return _frames_array(frames, name), fps
    return _frames_array(video, name), DEFAULT_FPS


def _open_image(path: Path, name: str) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except OSError as error:
        raise ValueError(f"{name}: frame {str(path)!r} cannot be read: {error}") from None


def _is_box(value: Any) -> bool:
    return isinstance(value, (tuple, list)) and len(value) == 4 and all(isinstance(v, (int, np.integer)) for v in value)


def load_masks(masks: Any, frames: int, size: tuple[int, int], threshold: float = 0.5, name: str = "masks") -> torch.Tensor:
    """Bool ``(F, H, W)`` (True = remove) for a clip of ``frames`` frames of ``size=(H, W)``.

    Count and size must match the clip's; a pixel is masked when its value scaled to [0, 1] is above
    ``threshold``. Refused: a mask that is empty in every frame, and a frame that is masked everywhere.
    """
    if _is_box(masks):
        stack = box_mask(list(masks), size)[None].expand(frames, -1, -1).clone()
    elif isinstance(masks, (tuple, list)) and masks and all(_is_box(b) for b in masks):
        _check_count(len(masks), frames, name)
        stack = torch.stack([box_mask(list(b), size) for b in masks])
    elif isinstance(masks, (tuple, list)):
        _check_count(len(masks), frames, name)
        stack = torch.stack([load_mask(m, size, threshold) for m in masks])
    else:
        stack = _mask_stack(masks, name, threshold)
        _check_count(stack.shape[0], frames, name)
        if tuple(stack.shape[1:]) != tuple(size):
            raise ValueError(f"{name} are {stack.shape[2]}x{stack.shape[1]} (WxH); the video is {size[1]}x{size[0]}")
    if not stack.any():
        raise ValueError(f"{name} are empty in every frame (no pixel above threshold={threshold}): nothing to remove")
    full = stack.flatten(1).all(dim=1).nonzero().flatten().tolist()
    if full:
        raise ValueError(f"{name} cover the whole of frame(s) {full}: no pixel of it is left to fill the hole from")
    return stack


def _check_count(count: int, frames: int, name: str) -> None:
    if count != frames:
        raise ValueError(f"{name} give {count} frame(s); the video has {frames}")


def _mask_stack(masks: Any, name: str, threshold: float) -> torch.Tensor:
    """Bool (F, H, W) from a mask video / folder path or an (F, H, W[, C]) array or tensor."""
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"threshold={threshold} must be in [0, 1)")
    if isinstance(masks, (str, os.PathLike)):
        array = load_video(masks, name)[0].astype(np.float32).mean(-1) / 255.0
    else:
        if isinstance(masks, torch.Tensor):
            masks = masks.detach().cpu().numpy()
        if not isinstance(masks, np.ndarray):
            raise ValueError(f"{name} of type {type(masks).__name__} is not a path, array, list of masks or boxes")  # noqa: TRY004
        array = masks.astype(np.float32)
        if masks.dtype == np.uint8 or (masks.dtype.kind in "iu" and array.max(initial=0) > 1):
            array = array / 255.0
        if array.ndim == 4:
            array = array.mean(-1)
        if array.ndim != 3:
            raise ValueError(f"{name} array has shape {masks.shape}; expected (frames, height, width)")
    return torch.from_numpy(array > threshold)


def linear_track(first: tuple[int, int, int, int], last: tuple[int, int, int, int], frames: int) -> list[tuple[int, ...]]:
    """``frames`` boxes moving linearly from box ``first`` to box ``last`` (each ``(x0, y0, x1, y1)``, pixels)."""
    if not (_is_box(first) and _is_box(last)):
        raise ValueError(f"first={first!r} and last={last!r} must be boxes of four integers (x0, y0, x1, y1)")
    if not isinstance(frames, int) or frames < 1:
        raise ValueError(f"frames={frames!r} must be a positive integer")
    a, b = np.asarray(first, np.float64), np.asarray(last, np.float64)
    return [tuple(int(v) for v in np.round(a + (b - a) * (t / max(frames - 1, 1)))) for t in range(frames)]


def save_video(frames: np.ndarray, path: str | os.PathLike, fps: float = DEFAULT_FPS) -> Path:
    """Write ``(F, H, W, 3)`` uint8 frames atomically: ``.gif``, a video suffix (H.264, ``yuv444p`` when a side is
    odd, so the size is kept exactly), or a folder of PNGs when ``path`` has no suffix."""
    path = Path(path)
    frames = _frames_array(frames, "frames")
    suffix = path.suffix.lower()
    if suffix and suffix not in VIDEO_SUFFIXES:
        raise ValueError(f"out={str(path)!r}: write {', '.join(VIDEO_SUFFIXES)} or a folder (a path without suffix)")
    if not suffix:
        path.mkdir(parents=True, exist_ok=True)
        for i, frame in enumerate(frames):
            tmp = path / f".{i:05d}.png.tmp"
            Image.fromarray(frame).save(tmp, format="PNG")
            os.replace(tmp, path / f"{i:05d}.png")
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        if suffix == ".gif":
            images = [Image.fromarray(f) for f in frames]
            images[0].save(tmp, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
        else:
            import imageio.v2 as imageio

            odd = frames.shape[1] % 2 or frames.shape[2] % 2
            with imageio.get_writer(tmp, format="FFMPEG", fps=fps, macro_block_size=1, quality=10,
                                    pixelformat="yuv444p" if odd else "yuv420p") as writer:
                for frame in frames:
                    writer.append_data(frame)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
