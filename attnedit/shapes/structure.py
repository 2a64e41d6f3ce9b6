"""A structure score for the shapes world: how close an image is to a clean scene of the world.

:func:`attnedit.shapes.world.fidelity` asks whether the right colours and shapes are there; it does not look at
how they are drawn, so a smeared blob of the right colour passes. This module asks the other question. It finds
the clean scene nearest to the image (each colour blob fitted by the best world shape at its own size and place,
the background kind that fits best), re-renders that scene with the world's own renderer, and compares:

- ``iou``: soft IoU (``sum min / sum max``) of the image's per-colour coverage with the render's. Coverage is
  each pixel's amount of each object colour over its grey (:func:`coverage`), so a half shape, a blob or a
  ragged edge (no world shape covers it) and a smeared edge (coverage spread over a wide band) both lower it,
  and colour pixels no fitted object explains (a third object, noise, a sliver) count against it.
- ``psnr``: PSNR of the whole image against the re-render. It checks what coverage cannot see: the background
  (kind and pattern), the exact object colours, noise on grey.

``score = sqrt(q_psnr * iou)`` with ``q_psnr = clip((PSNR - 12 dB) / (32 dB - 12 dB), 0, 1)``: a geometric mean,
so either failure alone pulls the score down. Clean renders are fitted to within a fraction of a pixel and reach
over 40 dB (1 after clipping); 12 dB is a wrong background or an object drawn elsewhere. An image with no object
blob scores 0 (every scene of the world has one or two objects). Validation (``tests/test_structure.py``):
renders of 50 sampled scenes score >= 0.988; corrupted renders fall with the corruption's strength.

>>> import random
>>> scene = world.sample_scene(random.Random(0))
>>> structure_score(scene.render(64)) > 0.95
True
"""

from __future__ import annotations

import dataclasses
import functools
import math
import random
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from attnedit.shapes import world

__all__ = ["FittedShape", "Structure", "StructureScore", "attribute_distance", "coverage", "distribution_distance",
           "fit_scene", "scene_attributes", "soft_iou", "structure", "structure_score"]

PSNR_RANGE = (12.0, 32.0)  # dB mapped to 0 and 1
_FILL = {"circle": math.pi / 4, "square": 0.88 ** 2, "triangle": 0.5}  # shape area / side^2 (square: 6 % inset)
_CENTROID_DY = {"circle": 0.0, "square": 0.0, "triangle": 1 / 6}  # centroid below the box centre, in sides


@dataclasses.dataclass(frozen=True)
class FittedShape(world.Shape):
    """A world shape at a free side (``fit_side``, fraction of the image); ``size`` is the nearest named size."""

    fit_side: float = 0.0

    @property
    def side(self) -> float:
        return self.fit_side


@dataclasses.dataclass(frozen=True)
class Structure:
    """The parts of the structure score: the fitted scene (None: no object blob), coverage IoU, PSNR and score."""

    scene: world.Scene | None
    iou: float  # soft IoU of the image's colour coverage with the fitted scene's, all colours together
    psnr: float  # dB, image vs the fitted scene's render
    score: float


def _as_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.shape[0] != image.shape[1] or image.shape[0] < 8:
        raise ValueError(f"image of shape {image.shape}: expected a square (S, S, 3) image, S >= 8")
    if image.dtype != np.uint8:
        if not np.issubdtype(image.dtype, np.floating):
            raise ValueError(f"image of dtype {image.dtype}: expected uint8 or float in [0, 1]")
        image = (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)
    return image


def _cover(obj: world.Shape, size: int) -> np.ndarray:
    """How much of each pixel ``obj`` covers, ``(size, size)`` in [0, 1]: the world's own drawing at 4x,
    box-downsampled, as :meth:`world.Scene.render` does."""
    canvas = Image.new("L", (size * 4, size * 4), 0)
    world._draw(ImageDraw.Draw(canvas), obj, size * 4, fill=255)
    return np.asarray(canvas.resize((size, size), Image.Resampling.BOX), np.float64) / 255


@functools.lru_cache(maxsize=16)
def _background_render(kind: str, size: int) -> np.ndarray:
    return world.Scene((), kind).render(size).astype(np.float64)


_SIDES = (0.8 * min(world.SIZES.values()), 1.2 * max(world.SIZES.values()))  # sides a fit may take


def _shape(kind: str, colour: str, side: float, cx: float, cy: float) -> FittedShape:
    side = min(max(side, _SIDES[0]), _SIDES[1])
    size = min(world.SIZES, key=lambda name: abs(world.SIZES[name] - side))
    return FittedShape(kind, colour, size, float(cx), float(cy), fit_side=float(side))


def _fit(amount: np.ndarray, colour: str) -> FittedShape:
    """The world shape nearest to one colour's coverage ``amount`` ``(S, S)``: each kind placed by moments
    (covered area -> side, centroid -> centre, exact on a render), then the best kind refined by a coordinate
    search in quarter-pixel steps on the soft IoU. The side stays within the world's sizes (-20 %, +20 %), so a
    sliver of a shape is not explained by a tiny one."""
    size = amount.shape[0]
    y, x = np.mgrid[:size, :size] + 0.5
    area = amount.sum()
    mx, my, area = (amount * x).sum() / area / size, (amount * y).sum() / area / size, area / size ** 2
    best, best_iou = None, -1.0
    for kind in world.SHAPES:
        side = math.sqrt(area / _FILL[kind])
        candidate = _shape(kind, colour, side, mx, my - _CENTROID_DY[kind] * side)
        iou = soft_iou(_cover(candidate, size), amount)
        if iou > best_iou:
            best, best_iou = candidate, iou
    step = 0.25 / size
    for _ in range(2):  # coordinate search: side, then centre x, then centre y
        for field in ("fit_side", "cx", "cy"):
            for delta in (-step, step):
                values = {"fit_side": best.fit_side, "cx": best.cx, "cy": best.cy}
                values[field] += delta
                candidate = _shape(best.shape, colour, values["fit_side"], values["cx"], values["cy"])
                iou = soft_iou(_cover(candidate, size), amount)
                if iou > best_iou:
                    best, best_iou = candidate, iou
                    break
    return best


def _background(image: np.ndarray, objects: np.ndarray) -> str:
    """The background kind whose render is closest to the image outside the object pixels."""
    size, outside = image.shape[0], ~objects
    errors = {}
    for kind in world.BACKGROUNDS:
        errors[kind] = float(((_background_render(kind, size) - image)[outside] ** 2).mean()) if outside.any() else 0.0
    return min(errors, key=errors.get)


def fit_scene(image: np.ndarray, max_objects: int = 2) -> world.Scene | None:
    """The clean world scene nearest to ``image`` ``(S, S, 3)``: the ``max_objects`` largest colour blobs (the
    detector's), each fitted by a world shape, over the best background (None without any blob)."""
    image = _as_image(image)
    size, amounts = image.shape[0], coverage(image)
    found = sorted(world.detect(image, min_area=0.0015).values(), key=lambda d: -d.area)[:max_objects]
    if not found:
        return None
    fits = []
    for d in found:  # moments over the blob's box grown by 2 px, so stray pixels elsewhere do not pull the fit
        x0, y0, x1, y1 = (round(v * size) for v in d.box)
        near = np.zeros((size, size))
        near[max(y0 - 2, 0):y1 + 2, max(x0 - 2, 0):x1 + 2] = 1
        amount = amounts[list(world.COLOURS).index(d.colour)] * near
        if amount.sum() > 0:  # a blob of the colour has some of its chroma; guard against a 0 area anyway
            fits.append(_fit(amount, d.colour))
    if not fits:
        return None
    return world.Scene(tuple(fits), _background(image, world.colour_labels(image) >= 0))


def coverage(image: np.ndarray) -> np.ndarray:
    """``(len(COLOURS), S, S)``: per object colour, how much of each pixel it covers, in [0, 1].

    A pixel of the world is ``a * colour + (1 - a) * grey``; removing each pixel's grey part (its mean over the
    channels) leaves ``a`` times the colour's own chroma, whatever the grey level. Each pixel counts for its
    nearest colour only, so colours do not leak into each other."""
    pixels = np.asarray(image, np.float64)
    palette = np.array(list(world.COLOURS.values()), np.float64)
    chroma, palette_chroma = pixels - pixels.mean(-1, keepdims=True), palette - palette.mean(-1, keepdims=True)
    amount = np.einsum("hwc,kc->khw", chroma, palette_chroma) / (palette_chroma ** 2).sum(-1)[:, None, None]
    nearest = np.linalg.norm(pixels[..., None, :] - palette, axis=-1).argmin(-1)
    return np.clip(amount, 0, 1) * (nearest[None] == np.arange(len(palette))[:, None, None])


def soft_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two coverages (``sum min / sum max``): 1 only when every pixel's amount of every colour agrees."""
    return float(np.minimum(a, b).sum() / max(np.maximum(a, b).sum(), 1e-9))


def structure(image: np.ndarray) -> Structure:
    """The structure score of ``image`` ``(S, S, 3)`` (uint8, or float in [0, 1]) with its parts."""
    image = _as_image(image)
    scene = fit_scene(image)
    if scene is None:
        return Structure(None, 0.0, float("nan"), 0.0)
    render = scene.render(image.shape[0])
    iou, value = soft_iou(coverage(image), coverage(render)), world.psnr(image, render)
    q_psnr = min(max((value - PSNR_RANGE[0]) / (PSNR_RANGE[1] - PSNR_RANGE[0]), 0.0), 1.0)
    return Structure(scene, iou, value, math.sqrt(q_psnr * iou))

def structure_score(image: np.ndarray) -> float:
    """How close ``image`` ``(S, S, 3)`` is to a clean scene of the world, in [0, 1] (1: a clean render)."""
    return structure(image).score


class StructureScore:
    """:func:`structure_score` as a HeadHunter objective: ``(M, 3, S, S)`` images in [0, 1] (videos
    ``(M, F, 3, S, S)``: mean over frames) -> ``(M,)`` scores.

    >>> from attnedit.methods.headhunter import headhunter
    >>> ranking = headhunter(pipe, StructureScore(), ["a red circle"], seeds=[0, 1])   # doctest: +SKIP
    """

    needs_prompts = False
    __name__ = "structure"

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim == 5:
            return torch.stack([self(images[:, f]) for f in range(images.shape[1])], 1).mean(1)
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images of shape {tuple(images.shape)}: expected (M, 3, S, S) or (M, F, 3, S, S)")
        pixels = images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
        return torch.tensor([structure_score(p) for p in pixels], dtype=torch.float32)


# ---------------------------------------------------------------------------------------- distribution level
def _attributes(scene: world.Scene | None, count: int) -> dict[str, list[str]]:
    objects = () if scene is None else scene.objects
    return {"count": [str(min(count, 3))], "colour": [o.colour for o in objects], "shape": [o.shape for o in objects],
            "size": [o.size for o in objects], "background": [] if scene is None else [scene.background]}


def _histograms(rows: Sequence[dict[str, list[str]]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for name in rows[0]:
        values = [v for row in rows for v in row[name]]
        out[name] = {v: values.count(v) / max(len(values), 1) for v in set(values)}
    return out


def scene_attributes(image: np.ndarray) -> dict[str, list[str]]:
    """The attributes :func:`distribution_distance` compares, for one image ``(S, S, 3)``: object count (3 = three
    or more), colours, shapes and sizes of its fitted scene's objects, and its background. Computed once per image,
    they let a caller resample a set (a bootstrap) without fitting the scenes again."""
    image = _as_image(image)
    return _attributes(fit_scene(image), len(world.detect(image, min_area=0.0015)))


@functools.lru_cache(maxsize=4)
def _reference(samples: int, seed: int) -> dict[str, dict[str, float]]:
    rng = random.Random(seed)
    return _histograms([_attributes(s, len(s.objects)) for s in (world.sample_scene(rng) for _ in range(samples))])


def attribute_distance(rows: Sequence[dict[str, list[str]]], samples: int = 2000, seed: int = 0) -> dict[str, float]:
    """:func:`distribution_distance` from per-image :func:`scene_attributes` ``rows`` (see there)."""
    if not len(rows):
        raise ValueError("rows is empty: attribute_distance needs the attributes of at least one image")
    reference, observed = _reference(samples, seed), _histograms(rows)
    out = {name: 0.5 * sum(abs(ref.get(v, 0.0) - observed[name].get(v, 0.0)) for v in set(ref) | set(observed[name]))
           for name, ref in reference.items()}
    out["mean"] = float(np.mean(list(out.values())))
    return out


def distribution_distance(images: Sequence[np.ndarray], samples: int = 2000, seed: int = 0) -> dict[str, float]:
    """How far the objects of ``images`` are from the world's distribution: per attribute (object count, colour,
    shape, size, background) the total variation distance between the histogram over the images' fitted scenes
    and over ``samples`` scenes of :func:`world.sample_scene`, and their ``"mean"``; each in [0, 1], 0: the same.
    """
    if not len(images):
        raise ValueError("images is empty: distribution_distance needs at least one image")
    return attribute_distance([scene_attributes(image) for image in images], samples, seed)
