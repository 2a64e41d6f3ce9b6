"""The structure score of the shapes world: near-perfect on renders, monotone in corruptions, and the
distribution distance near 0 on renders and high on a degenerate set."""

import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFilter

from attnedit.shapes import structure as st
from attnedit.shapes import world


def scenes(count, seed):
    rng = random.Random(seed)
    return [world.sample_scene(rng) for _ in range(count)]


def blur(scene, radius):
    image = scene.render(64)
    return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius))) if radius else image


def noise(scene, sigma):
    x = scene.render(64) + np.random.default_rng(0).normal(0, sigma, (64, 64, 3))
    return np.clip(x + 0.5, 0, 255).astype(np.uint8)


def erase(scene, fraction):
    """The right ``fraction`` of the first object's box painted with the background (0.5: cut in half)."""
    image, background = scene.render(64).copy(), world.Scene((), scene.background).render(64)
    x0, y0, x1, y1 = (v * 64 for v in scene.objects[0].box)
    cut, rows = round(x1 - fraction * (x1 - x0)), slice(int(y0), int(np.ceil(y1)))
    if fraction:
        image[rows, cut:int(np.ceil(x1))] = background[rows, cut:int(np.ceil(x1))]
    return image


def blob(scene, t):
    """The first object replaced by a soft ellipse of its colour, aspect (1 + t)^2, edge blurred by 3 t px."""
    if not t:
        return scene.render(64)
    obj = scene.objects[0]
    rest = world.Scene(scene.objects[1:], scene.background).render(64).astype(float)
    a, b, cx, cy = obj.side * 128 * (1 + t), obj.side * 128 / (1 + t), obj.cx * 256, obj.cy * 256
    alpha = Image.new("L", (256, 256), 0)
    ImageDraw.Draw(alpha).ellipse((cx - a, cy - b, cx + a, cy + b), fill=255)
    alpha = np.asarray(alpha.filter(ImageFilter.GaussianBlur(12 * t)).resize((64, 64), Image.Resampling.BOX), float)
    alpha = alpha[..., None] / 255
    return np.clip(rest * (1 - alpha) + alpha * np.array(world.COLOURS[obj.colour]) + 0.5, 0, 255).astype(np.uint8)


def shift(scene, s):
    """Every colour moved towards its channel rotation (a hue shift; greys stay)."""
    x = scene.render(64).astype(float)
    return np.clip((1 - s) * x + s * np.roll(x, 1, axis=-1) + 0.5, 0, 255).astype(np.uint8)


CORRUPTIONS = {
    "blur": (blur, [0, 0.5, 1, 1.5, 2, 3, 4, 6]),
    "noise": (noise, [0, 4, 8, 16, 32, 64]),
    "erase": (erase, [0, 0.1, 0.2, 0.3, 0.4, 0.5]),
    "blob": (blob, [0, 0.1, 0.2, 0.35, 0.5, 0.7]),
    "shift": (shift, [0, 0.05, 0.1, 0.2, 0.3, 0.45]),
}


def test_renders_score_near_perfect_and_fit_their_scene():
    for scene in scenes(50, seed=0):
        image = scene.render(64)
        result = st.structure(image)
        assert result.score >= 0.98, (scene, result)
        assert result.scene.background == scene.background
        fitted = sorted((o.colour, o.shape, o.size) for o in result.scene.objects)
        assert fitted == sorted((o.colour, o.shape, o.size) for o in scene.objects)
        assert 0.0 <= result.score <= 1.0


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_score_falls_monotonically_with_corruption_strength(name):
    corrupt, levels = CORRUPTIONS[name]
    per_scene = np.array([[st.structure_score(corrupt(s, level)) for level in levels] for s in scenes(6, seed=1)])
    mean = per_scene.mean(0)
    # non-increasing on the mean over scenes, up to 0.01: hard colour thresholds move by a pixel (and a blur
    # of 3 px turns a striped background into a clean grey one, which the background part rightly accepts)
    assert np.all(np.diff(mean) <= 0.01), (name, mean.round(3))
    assert mean[-1] <= mean[0] - 0.2, (name, mean.round(3))
    assert np.all(per_scene[:, -1] < per_scene[:, 0] - 0.1), (name, per_scene.round(3))


def test_no_object_scores_zero_and_bad_input_is_refused():
    assert st.structure_score(world.Scene((), "striped").render(64)) == 0.0
    with pytest.raises(ValueError, match="image of shape"):
        st.structure_score(np.zeros((64, 32, 3), np.uint8))


def test_headhunter_objective_scores_a_batch():
    images = np.stack([s.render(32) for s in scenes(3, seed=2)])
    batch = torch.tensor(images).permute(0, 3, 1, 2) / 255.0
    scores = st.StructureScore()(batch)
    assert scores.shape == (3,) and bool((scores > 0.95).all())
    assert st.StructureScore()(torch.zeros(2, 3, 3, 32, 32)).tolist() == [0.0, 0.0]  # videos: mean over frames


def test_distribution_distance_of_renders_is_small_and_of_a_degenerate_set_large():
    renders = [s.render(64) for s in scenes(100, seed=5)]
    assert st.distribution_distance(renders)["mean"] < 0.1
    red_circles = [world.Scene((world.Shape("circle", "red", "big", 0.5, 0.5),), "gray").render(64)] * 20
    distance = st.distribution_distance(red_circles)
    assert distance["mean"] > 0.5 and distance["shape"] > 0.6 and distance["colour"] > 0.7


def test_attribute_distance_from_per_image_attributes_equals_the_image_distance():
    images = [s.render(64) for s in scenes(12, seed=9)]
    rows = [st.scene_attributes(image) for image in images]
    assert st.attribute_distance(rows) == st.distribution_distance(images)
    assert rows[0]["count"] == [str(len(world.detect(images[0], min_area=0.0015)))]
    resampled = st.attribute_distance([rows[0]] * 12)  # a bootstrap draw of one image: its own histogram, farther
    assert resampled["mean"] > st.attribute_distance(rows)["mean"]
    with pytest.raises(ValueError, match="rows is empty"):
        st.attribute_distance([])
