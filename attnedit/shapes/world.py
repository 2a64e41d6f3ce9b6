"""A procedural world of flat shapes: seeded scenes, captions, renders, ground truth and a colour/shape detector.

No real image data can be downloaded here, and random-weight models only show that code runs. This world is small
enough for a diffusion model trained on two CPU cores to learn, and every scene keeps its ground truth (boxes,
masks, shapes, colours), so what an attention edit does can be *measured*: did the object land in its box, is the
removed object gone, are the shapes right. Objects of one scene always have different colours, and backgrounds are
grey, so a colour threshold finds each object.

>>> scene = sample_scene(random.Random(0))
>>> scene.caption()                     # e.g. 'a big red circle left of a small blue square on a striped background'
>>> image = scene.render(64)            # (64, 64, 3) uint8
>>> detect(image)["red"].shape          # 'circle' (when the red object is visible)
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: dict[str, float] = {"small": 0.24, "big": 0.38}  # side of the object's box, as a fraction of the image
BACKGROUNDS: dict[str, tuple[int, int]] = {"gray": (100, 100), "striped": (70, 130), "checkered": (70, 130)}
RELATIONS: dict[str, tuple[float, float]] = {  # direction from the first object to the second
    "left of": (1.0, 0.0), "right of": (-1.0, 0.0), "above": (0.0, 1.0), "below": (0.0, -1.0),
}
MOTIONS: dict[str, tuple[float, float]] = {"right": (1.0, 0.0), "left": (-1.0, 0.0), "down": (0.0, 1.0),
                                           "up": (0.0, -1.0)}
WORDS: tuple[str, ...] = (
    "a", "and", "on", "of", "background", "moving", "left", "right", "above", "below", "up", "down",
    *COLOURS, *SHAPES, *SIZES, *BACKGROUNDS,
)


@dataclasses.dataclass(frozen=True)
class Shape:
    """One object. ``cx, cy`` centre and ``side`` box edge are fractions of the image; y grows downwards."""

    shape: str
    colour: str
    size: str
    cx: float
    cy: float

    @property
    def side(self) -> float:
        return SIZES[self.size]

    @property
    def box(self) -> tuple[float, float, float, float]:
        """``(x0, y0, x1, y1)`` in [0, 1]."""
        h = self.side / 2
        return (self.cx - h, self.cy - h, self.cx + h, self.cy + h)

    @property
    def phrase(self) -> str:
        return f"{self.size} {self.colour} {self.shape}"

    def moved(self, dx: float, dy: float) -> Shape:
        return dataclasses.replace(self, cx=self.cx + dx, cy=self.cy + dy)


@dataclasses.dataclass(frozen=True)
class Scene:
    """Objects over a background, with how the caption relates them (``relation``) or moves them (``motions``)."""

    objects: tuple[Shape, ...]
    background: str = "gray"
    relation: str | None = None
    motions: tuple[str, ...] = ()

    def caption(self, with_size: bool = True, with_background: bool = True) -> str:
        phrases = [("a " + (o.phrase if with_size else f"{o.colour} {o.shape}")) for o in self.objects]
        if self.motions:
            phrases = [f"{p} moving {m}" for p, m in zip(phrases, self.motions)]
        joiner = f" {self.relation} " if self.relation and len(phrases) == 2 else " and "
        text = joiner.join(phrases)
        return f"{text} on a {self.background} background" if with_background else text

    def render(self, size: int = 64) -> np.ndarray:
        """``(size, size, 3)`` uint8, antialiased by drawing at 4x and downsampling."""
        big = size * 4
        image = Image.fromarray(_background(self.background, big))
        draw = ImageDraw.Draw(image)
        for obj in self.objects:
            _draw(draw, obj, big)
        return np.asarray(image.resize((size, size), Image.Resampling.BOX))

    def masks(self, size: int = 64) -> list[np.ndarray]:
        """One bool ``(size, size)`` mask per object (later objects occlude earlier ones)."""
        out = []
        for i, obj in enumerate(self.objects):
            canvas = Image.new("L", (size * 4, size * 4), 0)
            _draw(ImageDraw.Draw(canvas), obj, size * 4, fill=255)
            for later in self.objects[i + 1:]:
                _draw(ImageDraw.Draw(canvas), later, size * 4, fill=0)
            out.append(np.asarray(canvas.resize((size, size), Image.Resampling.BOX)) >= 128)
        return out


def _background(kind: str, size: int) -> np.ndarray:
    low, high = BACKGROUNDS[kind]
    y, x = np.mgrid[:size, :size]
    if kind == "striped":
        on = ((x + y) // (size // 8)) % 2 == 0
    elif kind == "checkered":
        on = ((x // (size // 8)) + (y // (size // 8))) % 2 == 0
    else:
        on = np.zeros((size, size), bool)
    grey = np.where(on, high, low).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)


def _draw(draw: ImageDraw.ImageDraw, obj: Shape, size: int, fill: int | tuple | None = None) -> None:
    x0, y0, x1, y1 = (v * size for v in obj.box)
    fill = COLOURS[obj.colour] if fill is None else fill
    if obj.shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif obj.shape == "square":
        inset = (x1 - x0) * 0.06  # a square of equal area reads as equally big as the circle
        draw.rectangle((x0 + inset, y0 + inset, x1 - inset, y1 - inset), fill=fill)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)


# ------------------------------------------------------------------------------------------------ sampling
def _place(rng: random.Random, side: float) -> tuple[float, float]:
    lo, hi = side / 2 + 0.02, 1 - side / 2 - 0.02
    return rng.uniform(lo, hi), rng.uniform(lo, hi)


def _pair(rng: random.Random, sizes: tuple[str, str], relation: str) -> tuple[tuple[float, float], ...]:
    """Centres for two objects so that the first is ``relation`` the second, without overlap."""
    dx, dy = RELATIONS[relation]
    sa, sb = SIZES[sizes[0]], SIZES[sizes[1]]
    gap = (sa + sb) / 2 + 0.04
    lo_a, hi_a, lo_b, hi_b = sa / 2 + 0.02, 1 - sa / 2 - 0.02, sb / 2 + 0.02, 1 - sb / 2 - 0.02
    a_along = rng.uniform(lo_a, min(hi_a, hi_b - gap))  # along the relation's axis, counted in its direction
    b_along = rng.uniform(max(lo_b, a_along + gap), hi_b)
    a_across = rng.uniform(lo_a, hi_a)
    spread = 0.5 * (b_along - a_along)
    b_across = min(max(a_across + rng.uniform(-spread, spread), lo_b), hi_b)
    if dx + dy < 0:  # "right of" / "below": mirror the axis
        a_along, b_along = 1 - a_along, 1 - b_along
    if dx:
        return (a_along, a_across), (b_along, b_across)
    return (a_across, a_along), (b_across, b_along)


def sample_scene(rng: random.Random, max_objects: int = 2, relation_prob: float = 0.75) -> Scene:
    """A random scene of 1..``max_objects`` (at most 2) objects of distinct colours."""
    n = rng.randint(1, min(max_objects, 2))
    colours = rng.sample(list(COLOURS), n)
    shapes = [rng.choice(SHAPES) for _ in range(n)]
    sizes = tuple(rng.choice(list(SIZES)) for _ in range(n))
    background = rng.choice(list(BACKGROUNDS))
    if n == 1:
        return Scene((Shape(shapes[0], colours[0], sizes[0], *_place(rng, SIZES[sizes[0]])),), background)
    relation = rng.choice(list(RELATIONS))
    centres = _pair(rng, sizes, relation)
    objects = tuple(Shape(s, c, z, *xy) for s, c, z, xy in zip(shapes, colours, sizes, centres))
    return Scene(objects, background, relation if rng.random() < relation_prob else None)


def sample_video_scene(rng: random.Random, frames: int, speed: float = 0.35) -> tuple[Scene, list[Scene]]:
    """A scene whose objects move in straight lines; returns the captioned scene and one scene per frame.

    ``speed`` is the distance travelled over the whole clip, as a fraction of the image.
    """
    n = rng.randint(1, 2)
    colours = rng.sample(list(COLOURS), n)
    objects, motions = [], []
    for colour in colours:
        size, motion = rng.choice(list(SIZES)), rng.choice(list(MOTIONS))
        mx, my = MOTIONS[motion]
        side = SIZES[size]
        lo, hi = side / 2 + 0.02, 1 - side / 2 - 0.02
        start = [rng.uniform(lo, hi), rng.uniform(lo, hi)]
        for axis, m in ((0, mx), (1, my)):  # start far enough from the edge it moves towards
            if m > 0:
                start[axis] = rng.uniform(lo, hi - speed)
            elif m < 0:
                start[axis] = rng.uniform(lo + speed, hi)
        objects.append(Shape(rng.choice(SHAPES), colour, size, *start))
        motions.append(motion)
    scene = Scene(tuple(objects), rng.choice(list(BACKGROUNDS)), motions=tuple(motions))
    steps = [t / max(frames - 1, 1) * speed for t in range(frames)]
    per_frame = [dataclasses.replace(scene, objects=tuple(
        o.moved(MOTIONS[m][0] * s, MOTIONS[m][1] * s) for o, m in zip(objects, motions))) for s in steps]
    return scene, per_frame


def render_video(frames: Sequence[Scene], size: int = 32) -> np.ndarray:
    """``(frames, size, size, 3)`` uint8."""
    return np.stack([f.render(size) for f in frames])


def parse_caption(caption: str) -> Scene:
    """The scene a caption asks for (positions unknown: centred), so generated images can be scored against it."""
    words = caption.lower().replace(",", " ").split()
    objects, motions, background, relation = [], [], "gray", None
    i = 0
    while i < len(words):
        w = words[i]
        if w in SHAPES:
            back = words[max(0, i - 3):i]
            colour = next((c for c in reversed(back) if c in COLOURS), None)
            size = next((s for s in reversed(back) if s in SIZES), "small")
            if colour is None:
                raise ValueError(f"caption {caption!r}: no colour before {w!r}; colours: {list(COLOURS)}")
            objects.append(Shape(w, colour, size, 0.5, 0.5))
            if words[i + 1:i + 2] == ["moving"] and i + 2 < len(words):
                motions.append(words[i + 2])
        elif w in BACKGROUNDS and words[i + 1:i + 2] == ["background"]:
            background = w
        elif " ".join(words[i:i + 2]) in RELATIONS:
            relation = " ".join(words[i:i + 2])
        elif w in ("above", "below"):
            relation = w
        i += 1
    if not objects:
        raise ValueError(f"caption {caption!r} names no shape; shapes: {list(SHAPES)}")
    return Scene(tuple(objects), background, relation, tuple(motions))


# ----------------------------------------------------------------------------------------------- detection
@dataclasses.dataclass(frozen=True)
class Detection:
    """A coloured blob: its area (fraction of the image), box and centre in [0, 1], and the best-fitting shape."""

    colour: str
    area: float
    box: tuple[float, float, float, float]
    centre: tuple[float, float]
    shape: str
    shape_iou: float  # IoU of the blob with that shape drawn in its box


def _templates(box: tuple[float, float, float, float], h: int, w: int) -> dict[str, np.ndarray]:
    """Each shape drawn into ``box`` (pixel units) as a bool ``(h, w)`` mask, analytically."""
    x0, y0, x1, y1 = box
    y, x = np.mgrid[:h, :w] + 0.5
    cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, max((x1 - x0) / 2, 0.5), max((y1 - y0) / 2, 0.5)
    inside = (x >= x0) & (x <= x1) & (y >= y0) & (y <= y1)
    return {
        "circle": ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1,
        "square": inside,
        "triangle": inside & (np.abs(x - cx) <= (y - y0) / (2 * ry) * rx),
    }


def _classify(mask: np.ndarray, box: tuple[float, float, float, float]) -> tuple[str, float]:
    ious = {}
    for name, template in _templates(box, *mask.shape).items():
        ious[name] = float((template & mask).sum() / max((template | mask).sum(), 1))
    best = max(ious, key=ious.get)
    return best, ious[best]


_GREY_LIMIT = 45  # max channel spread of a grey pixel


def colour_labels(image: np.ndarray, max_distance: float = 90.0) -> np.ndarray:
    """Per pixel: index into COLOURS of the nearest object colour, or -1 for grey/background/unclear pixels."""
    pixels = np.asarray(image, np.float32)[..., :3]
    palette = np.array(list(COLOURS.values()), np.float32)
    distance = np.linalg.norm(pixels[..., None, :] - palette, axis=-1)
    labels = distance.argmin(-1)
    spread = pixels.max(-1) - pixels.min(-1)
    labels[(distance.min(-1) > max_distance) | (spread < _GREY_LIMIT)] = -1
    return labels


def detect(image: np.ndarray, min_area: float = 0.004, region: np.ndarray | None = None) -> dict[str, Detection]:
    """Blobs of each object colour in ``image`` ``(H, W, 3)`` uint8, keyed by colour (only those covering
    ``min_area`` of the image). ``region`` (bool ``(H, W)``) restricts the search."""
    labels = colour_labels(image)
    h, w = labels.shape
    found = {}
    for index, name in enumerate(COLOURS):
        mask = labels == index
        if region is not None:
            mask &= region
        if mask.sum() < max(min_area * h * w, 1):
            continue
        ys, xs = np.nonzero(mask)
        box = (np.percentile(xs, 1), np.percentile(ys, 1), np.percentile(xs, 99) + 1, np.percentile(ys, 99) + 1)
        shape, iou = _classify(mask, box)
        found[name] = Detection(name, float(mask.mean()), (box[0] / w, box[1] / h, box[2] / w, box[3] / h),
                                (float(xs.mean() / w), float(ys.mean() / h)), shape, iou)
    return found


def in_box(detection: Detection | None, box: Sequence[float], margin: float = 0.05) -> bool:
    """Whether a detected blob's centre lies inside ``box`` (grown by ``margin``)."""
    if detection is None:
        return False
    x, y = detection.centre
    return box[0] - margin <= x <= box[2] + margin and box[1] - margin <= y <= box[3] + margin


def fidelity(image: np.ndarray, scene: Scene) -> float:
    """How well ``image`` shows the objects ``scene`` asks for, in [0, 1].

    Per asked object: half a point when its colour is present at a plausible area (a third to three times its
    expected size), the other half when the detected shape is also right. Colours nobody asked for cost a
    quarter point each. Averaged over objects and clipped to [0, 1].
    """
    found = detect(image)
    score = 0.0
    for obj in scene.objects:
        d = found.get(obj.colour)
        expected = obj.side ** 2 * 0.8
        if d is not None and expected / 3 <= d.area <= expected * 3:
            score += 0.5 + 0.5 * (d.shape == obj.shape)
    asked = {o.colour for o in scene.objects}
    score -= 0.25 * sum(1 for c, d in found.items() if c not in asked and d.area >= 0.01)
    return float(min(max(score / len(scene.objects), 0.0), 1.0))


def psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Peak signal-to-noise ratio in dB between two uint8 images, optionally over ``mask`` pixels only."""
    diff = (np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2
    if mask is not None:
        diff = diff[np.asarray(mask, bool)]
    mse = float(diff.mean()) if diff.size else 0.0
    return float("inf") if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean structural similarity of two uint8 images or videos (last axis colour), 7x7 uniform windows."""
    x = np.asarray(a, np.float64).reshape(-1, *np.shape(a)[-3:]).mean(-1)
    y = np.asarray(b, np.float64).reshape(-1, *np.shape(b)[-3:]).mean(-1)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2

    def blur(z: np.ndarray) -> np.ndarray:
        k = 7
        padded = np.pad(z, ((0, 0), (k // 2, k // 2), (k // 2, k // 2)), mode="reflect")
        c = padded.cumsum(1).cumsum(2)
        c = np.pad(c, ((0, 0), (1, 0), (1, 0)))
        return (c[:, k:, k:] - c[:, :-k, k:] - c[:, k:, :-k] + c[:, :-k, :-k]) / (k * k)

    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    value = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return float(value.mean())
