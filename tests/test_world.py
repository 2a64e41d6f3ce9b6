"""The shapes world: scenes agree with their captions, renders with their ground truth, the detector with both."""

import random

import numpy as np
import pytest

from attnedit.shapes import world


def scenes(count, seed=0, **options):
    rng = random.Random(seed)
    return [world.sample_scene(rng, **options) for _ in range(count)]


def test_sampling_is_seeded_and_varied():
    a, b = scenes(50), scenes(50)
    assert a == b
    assert {s.caption() for s in a} != {s.caption() for s in scenes(50, seed=1)}
    assert {len(s.objects) for s in a} == {1, 2}
    assert {o.shape for s in a for o in s.objects} == set(world.SHAPES)
    assert {s.background for s in a} == set(world.BACKGROUNDS)


def test_two_objects_have_distinct_colours_and_do_not_overlap():
    for scene in scenes(300):
        if len(scene.objects) == 2:
            a, b = scene.objects
            assert a.colour != b.colour
            masks = scene.masks(64)
            assert not (masks[0] & masks[1]).any()
        for obj in scene.objects:
            assert all(0.0 <= v <= 1.0 for v in obj.box)


@pytest.mark.parametrize("relation", list(world.RELATIONS))
def test_relation_in_caption_matches_geometry(relation):
    seen = 0
    for scene in scenes(400):
        if scene.relation != relation:
            continue
        seen += 1
        a, b = scene.objects
        dx, dy = world.RELATIONS[relation]
        assert (b.cx - a.cx) * dx + (b.cy - a.cy) * dy > 0, scene.caption()
        assert f"{a.phrase} {relation} a {b.phrase}" in scene.caption()
    assert seen > 10


def test_caption_variants_and_parse_round_trip():
    scene = world.Scene((world.Shape("circle", "red", "big", 0.3, 0.5), world.Shape("square", "blue", "small", 0.7, 0.5)),
                        "striped", "left of")
    assert scene.caption() == "a big red circle left of a small blue square on a striped background"
    assert scene.caption(with_size=False, with_background=False) == "a red circle left of a blue square"
    parsed = world.parse_caption(scene.caption())
    assert [(o.shape, o.colour, o.size) for o in parsed.objects] == [(o.shape, o.colour, o.size) for o in scene.objects]
    assert (parsed.background, parsed.relation) == ("striped", "left of")
    assert set(scene.caption().split()) <= set(world.WORDS)


def test_parse_caption_rejects_captions_without_objects():
    with pytest.raises(ValueError, match="names no shape"):
        world.parse_caption("a cat on the grass")
    with pytest.raises(ValueError, match="no colour"):
        world.parse_caption("a circle")


def test_detector_recovers_ground_truth_of_renders():
    checked = 0
    for scene in scenes(200, seed=3):
        image = scene.render(64)
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8
        found = world.detect(image)
        assert set(found) == {o.colour for o in scene.objects}
        for obj in scene.objects:
            d = found[obj.colour]
            assert d.shape == obj.shape, (scene.caption(), d)
            assert world.in_box(d, obj.box, margin=0.0)
            checked += 1
        assert world.fidelity(image, scene) == 1.0
    assert checked > 250


def test_fidelity_penalizes_wrong_shape_missing_and_extra_objects():
    scene = world.Scene((world.Shape("circle", "red", "big", 0.5, 0.5),))
    wrong_shape = world.Scene((world.Shape("square", "red", "big", 0.5, 0.5),)).render(64)
    assert world.fidelity(wrong_shape, scene) == 0.5
    assert world.fidelity(world.Scene(()).render(64), scene) == 0.0
    extra = world.Scene((scene.objects[0], world.Shape("square", "blue", "big", 0.2, 0.2))).render(64)
    assert world.fidelity(extra, scene) == 0.75


def test_video_objects_move_as_captioned():
    caption_scene, frames = world.sample_video_scene(random.Random(5), 9)
    video = world.render_video(frames, 32)
    assert video.shape == (9, 32, 32, 3)
    for obj, motion in zip(caption_scene.objects, caption_scene.motions):
        assert f"moving {motion}" in caption_scene.caption()
        first, last = world.detect(video[0])[obj.colour], world.detect(video[-1])[obj.colour]
        dx, dy = world.MOTIONS[motion]
        moved = (last.centre[0] - first.centre[0]) * dx + (last.centre[1] - first.centre[1]) * dy
        assert moved > 0.2


def test_psnr_and_ssim_reference_values():
    a = world.Scene((world.Shape("circle", "red", "big", 0.5, 0.5),)).render(64)
    assert world.psnr(a, a) == float("inf")
    assert world.ssim(a, a) == pytest.approx(1.0)
    noisy = np.clip(a.astype(int) + np.random.default_rng(0).integers(-8, 9, a.shape), 0, 255).astype(np.uint8)
    mse = ((a.astype(float) - noisy) ** 2).mean()
    assert world.psnr(a, noisy) == pytest.approx(10 * np.log10(255 ** 2 / mse))
    assert 0.5 < world.ssim(a, noisy) < 1.0
    striped = world.Scene((), "striped").render(64)
    assert world.ssim(striped, 255 - striped) < 0.0  # inverted structure: negative covariance
