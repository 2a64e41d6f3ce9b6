"""The web app in a real browser: Debian's Chromium driven by Playwright, on the built-in trained model."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# screenshots go to docs/screenshots only when asked (ATTNEDIT_SCREENSHOTS=1), so test runs leave the tree clean
SCREENSHOTS = Path(__file__).resolve().parent.parent / "docs" / "screenshots"
pytestmark = pytest.mark.skipif(
    not os.path.exists(CHROMIUM) and not os.environ.get("CI"), reason="Debian chromium not installed (CI installs it)"
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def app_url():
    from attnedit.shapes.builtin import load_builtin
    from attnedit.surfaces.webapp import build_app

    demo = build_app(load_builtin("shapes-t2i"), "shapes-t2i")  # the app's default model
    demo.queue(default_concurrency_limit=1, max_size=16)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


@pytest.fixture(scope="module")
def page(app_url):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"],
        )
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(app_url)
        page.wait_for_selector("text=Generate", timeout=60_000)
        yield page
        browser.close()


def close_toasts(page) -> None:
    for close in page.locator(".toast-close").all():
        close.click()
    page.wait_for_function("() => !document.querySelector('.toast-body')", timeout=10_000)


def shoot(page, tmp_path, name: str) -> None:
    """Full-page screenshot, into docs/screenshots with ATTNEDIT_SCREENSHOTS=1, else into tmp_path."""
    folder = SCREENSHOTS if os.environ.get("ATTNEDIT_SCREENSHOTS") else tmp_path
    folder.mkdir(parents=True, exist_ok=True)
    close_toasts(page)
    shown = "[...document.images].filter(img => img.offsetParent)"  # the open tab's images, loaded
    page.wait_for_function(f"() => {shown}.every(img => img.complete && img.naturalWidth > 0)", timeout=30_000)
    page.screenshot(path=str(folder / f"{name}.png"), full_page=True)
    assert (folder / f"{name}.png").stat().st_size > 10_000


def open_tab(page, name: str) -> None:
    close_toasts(page)
    page.get_by_role("tab", name=name, exact=True).click()


def run_and_wait(page, button, selector: str, timeout: int = 120_000) -> int:
    """Click ``button``, wait for the first image under ``selector`` (fail at once on an error toast); its width."""
    close_toasts(page)
    button.click()
    image, error = page.locator(f"{selector} img").first, page.locator(".toast-body.error")
    image.or_(error).first.wait_for(state="visible", timeout=timeout)
    assert not error.count(), error.first.inner_text()
    page.wait_for_function(f"() => document.querySelector('{selector} img')?.naturalWidth > 0", timeout=timeout)
    return image.evaluate("img => img.naturalWidth")


def shown_image(page, selector: str, index: int = 0):
    """The image the browser shows under ``selector``, as a uint8 (H, W, 3) array (what the detector judges)."""
    import base64
    import io

    import numpy as np
    from PIL import Image

    src = page.locator(f"{selector} img").nth(index).get_attribute("src")
    data = base64.b64decode(src.split(",", 1)[1]) if src.startswith("data:") else page.request.get(src).body()
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def overlay_heat(image, overlaid):
    """The heat (0..1) of an attention map the app laid over ``image`` (webapp_tabs.overlay), read back from red."""
    red, over = image[..., 0].astype(float), overlaid[..., 0].astype(float)
    return (over - 0.615 * red) / (140.25 - 0.165 * red)


def png_parameters(page, selector: str) -> dict:
    """The parameters embedded in the PNG the app serves under ``selector`` (what its download button saves)."""
    import io
    import json

    from PIL import Image

    data = page.request.get(page.locator(f"{selector} img").first.get_attribute("src")).body()
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG" and "Seed: " in image.text["parameters"]
        return json.loads(image.text["attnedit"])


def test_generation_shows_an_image_and_token_maps(page, tmp_path):
    open_tab(page, "Attention maps")
    page.get_by_label("Prompt").first.fill("a red circle")
    assert run_and_wait(page, page.get_by_role("button", name="Generate", exact=True), "#maps-image") == 64
    page.locator("#maps-gallery img").first.wait_for(state="visible", timeout=60_000)
    assert page.locator("#maps-gallery img").count() >= 3
    from attnedit.shapes import world

    image = shown_image(page, "#maps-image")  # the word's attention lies on the object the detector finds
    assert "red" in world.detect(image)
    inside = world.colour_labels(image) == list(world.COLOURS).index("red")
    for index in (1, 2):  # "red", "circle": its map mass inside the object is well above outside
        heat = overlay_heat(image, shown_image(page, "#maps-gallery", index))
        assert heat[inside].mean() > 1.5 * heat[~inside].mean()
    # the 64 px result is shown enlarged, nearest-neighbour
    shown = page.locator("#maps-image img").first.evaluate(
        "img => [img.getBoundingClientRect().width, getComputedStyle(img).imageRendering]")
    assert shown[0] >= 4 * 64 and shown[1] == "pixelated"
    # a random seed: the one used is shown back in the seed box
    page.locator("#maps-random input").check()
    run_and_wait(page, page.get_by_role("button", name="Generate", exact=True), "#maps-image")
    page.wait_for_function("() => Number(document.querySelector('#maps-seed input').value) > 0", timeout=60_000)
    used = int(page.locator("#maps-seed input").input_value())  # the result's PNG says how it was made
    assert png_parameters(page, "#maps-image") == {"prompt": "a red circle", "seed": used, "steps": 20,
                                                   "guidance_scale": 4.0, "width": 64, "height": 64,
                                                   "model": "shapes-t2i"}
    page.locator("#maps-random input").uncheck()
    page.locator("#maps-seed input").fill("0")
    shoot(page, tmp_path, "attention-maps")


def test_bad_input_shows_a_message(page):
    open_tab(page, "Attention maps")
    page.get_by_label("Prompt").first.fill("   ")
    page.get_by_role("button", name="Generate", exact=True).click()
    page.wait_for_selector("text=the prompt is empty", timeout=60_000)
    page.get_by_label("Prompt").first.fill("a red circle")
    page.locator("#maps-width input").fill("70")  # a size the model cannot take: a message naming it
    page.get_by_role("button", name="Generate", exact=True).click()
    page.wait_for_selector("text=width=70 must be a multiple of 16", timeout=60_000)
    page.locator("#maps-width input").fill("64")
    close_toasts(page)


def test_grounded_generation_shows_image_and_phrase_maps(page, tmp_path):
    open_tab(page, "Grounded generation")
    page.locator("#grounded-boxes textarea").fill("red circle: 0.05,0.2,0.5,0.9\nblue square: 0.5,0.3,0.95,0.95")
    from attnedit.shapes import world

    assert run_and_wait(page, page.locator("#grounded-run"), "#grounded-image") == 64
    page.locator("#grounded-maps img").first.wait_for(state="visible", timeout=60_000)
    assert page.locator("#grounded-maps img").count() == 2
    assert page.locator("#grounded-random input").count() == 1 and png_parameters(page, "#grounded-image")["seed"] == 0
    found = world.detect(shown_image(page, "#grounded-image"))  # each object in its box
    assert world.in_box(found.get("red"), (0.05, 0.2, 0.5, 0.9)) and world.in_box(found.get("blue"), (0.5, 0.3, 0.95, 0.95))
    shoot(page, tmp_path, "grounded-generation")


def test_grounded_bad_box_shows_a_message(page):
    open_tab(page, "Grounded generation")
    page.locator("#grounded-boxes textarea").fill("red circle: 0.5,0.2,0.1,0.9")
    page.locator("#grounded-run").click()
    page.wait_for_selector("text=must have x1 > x0", timeout=60_000)
    page.locator("#grounded-boxes textarea").fill("red circle: 0.05,0.2,0.5,0.9\nblue square: 0.5,0.3,0.95,0.95")


def test_edit_uploads_an_image_and_removes_a_box(page, tmp_path):
    from PIL import Image

    from attnedit.shapes import world

    source = tmp_path / "source.png"  # a real image for the model: rendered, not generated
    scene = world.Scene((world.Shape("circle", "red", "big", 0.4, 0.5), world.Shape("square", "blue", "small", 0.8, 0.5)))
    Image.fromarray(scene.render(64)).save(source)
    open_tab(page, "Edit")
    page.locator("#edit-source input[type=file]").set_input_files(str(source))
    page.locator("#edit-source img").first.wait_for(state="visible", timeout=30_000)  # uploaded to the server
    page.locator("#edit-box").get_by_role("textbox").fill("12,12,40,40")
    result, error = page.locator("#edit-image img").first, page.locator(".toast-body.error")
    page.locator("#edit-run").click()
    result.or_(error).first.wait_for(state="visible", timeout=120_000)
    assert not error.count(), error.first.inner_text()
    page.wait_for_function("() => document.querySelector('#edit-image img')?.naturalWidth > 0", timeout=120_000)
    assert result.evaluate("img => img.naturalWidth") == 64
    found = world.detect(shown_image(page, "#edit-image"))  # the default removal: the circle gone, the square kept
    assert "red" not in found and found["blue"].shape == "square"
    page.locator("#edit-preview img").first.wait_for(state="visible", timeout=60_000)  # the grown mask's preview
    shoot(page, tmp_path, "edit")  # (it waits for the shown images; the queue's stream keeps the network busy)


def test_an_unreadable_upload_is_a_message(page, tmp_path):
    bad = tmp_path / "not-an-image.png"
    bad.write_text("this is text, not a PNG")
    open_tab(page, "Edit")
    page.locator("#edit-source input[type=file]").set_input_files(str(bad))
    page.wait_for_selector("text=is not an image this app can read", timeout=60_000)
    close_toasts(page)


def test_head_guidance_shows_both_images(page, tmp_path):
    open_tab(page, "Head guidance")
    assert run_and_wait(page, page.locator("#guidance-run"), "#guidance-on") == 64
    assert page.locator("#guidance-off img").evaluate("img => img.naturalWidth") == 64
    assert png_parameters(page, "#guidance-on")["heads"] == "L1H0,L1H1"
    from attnedit.shapes import world

    for selector in ("#guidance-off", "#guidance-on"):  # both of the caption's objects (by colour) in each
        assert {"yellow", "green"} <= set(world.detect(shown_image(page, selector)))
    assert "heads" not in png_parameters(page, "#guidance-off")
    # a random seed, shown back and embedded in both results (each generating tab has the option)
    page.locator("#guidance-random input").check()
    run_and_wait(page, page.locator("#guidance-run"), "#guidance-on")
    page.wait_for_function("() => Number(document.querySelector('#guidance-seed input').value) > 0", timeout=60_000)
    used = int(page.locator("#guidance-seed input").input_value())
    assert png_parameters(page, "#guidance-on")["seed"] == png_parameters(page, "#guidance-off")["seed"] == used
    page.locator("#guidance-random input").uncheck()
    page.locator("#guidance-seed input").fill("0")
    # Stop during a run: no error, and the next run (seed 5) completes
    page.locator("#guidance-run").click()
    page.locator("#guidance-stop").click()
    page.wait_for_timeout(0)  # a click right after Stop is not lost
    page.locator("#guidance-seed input").fill("5")
    run_and_wait(page, page.locator("#guidance-run"), "#guidance-on")
    for _ in range(120):
        if png_parameters(page, "#guidance-on")["seed"] == 5:
            break
        page.wait_for_timeout(500)
    assert png_parameters(page, "#guidance-on")["seed"] == 5 and not page.locator(".toast-body.error").count()
    page.locator("#guidance-seed input").fill("0")
    shoot(page, tmp_path, "head-guidance")


def test_the_head_text_box_refuses_a_path(page):
    open_tab(page, "Head guidance")
    page.get_by_label("Heads ('L1H0,L1H1'").fill("/etc/passwd")
    page.locator("#guidance-run").click()
    page.wait_for_selector("text=upload a ranking JSON instead", timeout=60_000)
    page.get_by_label("Heads ('L1H0,L1H1'").fill("L1H0,L1H1")
    close_toasts(page)


def test_video_tab_loads_the_builtin_video_model_and_shows_frames(page, tmp_path):
    open_tab(page, "Video")
    run_and_wait(page, page.locator("#video-run"), "#video-frames")
    assert page.locator("#video-frames img").count() == 9  # the frames shapes-t2v was trained on
    from attnedit.shapes import world

    found = [world.detect(shown_image(page, "#video-frames", i)).get("red") for i in (0, 4, 8)]  # a red object in every frame, moving right as the prompt asks
    assert all(found) and found[0].centre[0] < found[1].centre[0] < found[2].centre[0]
    assert page.locator("#video-random input").count() == 1
    shoot(page, tmp_path, "video")


def test_remove_from_video_takes_the_tracked_object_and_keeps_the_other(page, tmp_path):
    from attnedit.pipelines.video_io import load_video, save_video
    from attnedit.shapes import world

    scenes = [world.Scene((world.Shape("circle", "red", "big", 0.3 + 0.04 * i, 0.5),
                           world.Shape("square", "blue", "small", 0.8, 0.2))) for i in range(9)]
    clip = save_video(world.render_video(scenes, 32), tmp_path / "clip.mp4", 8)
    open_tab(page, "Remove from video")
    page.locator("#vedit-source input[type=file]").set_input_files(str(clip))
    page.locator("#vedit-source video").first.wait_for(state="attached", timeout=30_000)
    page.locator("#vedit-first").get_by_role("textbox").fill("2,7,18,25")
    page.locator("#vedit-last").get_by_role("textbox").fill("6,7,22,25")
    close_toasts(page)
    page.locator("#vedit-run").click()
    result, error = page.locator("#vedit-out video").first, page.locator(".toast-body.error")
    result.or_(error).first.wait_for(state="attached", timeout=120_000)
    assert not error.count(), error.first.inner_text()
    (tmp_path / "out.mp4").write_bytes(page.request.get(result.get_attribute("src")).body())
    found = [world.detect(frame) for frame in load_video(tmp_path / "out.mp4")[0]]
    assert len(found) == 9 and not any("red" in f for f in found) and all("blue" in f for f in found)


def test_box_canvas_shows_the_typed_boxes_and_gives_them_back(page):
    open_tab(page, "Grounded generation")
    page.get_by_text("Draw boxes (label each with its phrase)").click()
    page.locator("#grounded-canvas canvas").first.wait_for(state="visible", timeout=30_000)
    # the canvas shows the typed boxes (in the preview's colours): using them gives the same layout back
    page.locator("#grounded-boxes textarea").fill("red circle: 0.1,0.2,0.5,0.6")
    page.wait_for_timeout(1000)
    page.locator("#grounded-use-drawn").click()
    page.wait_for_function("() => document.querySelector('#grounded-boxes textarea').value === "
                           "'red circle: 0.100,0.199,0.500,0.600'", timeout=30_000)
    page.locator("#grounded-boxes textarea").fill("red circle: 0.05,0.2,0.5,0.9\nblue square: 0.5,0.3,0.95,0.95")


def test_the_history_shows_the_sessions_results_newest_first_with_their_seed(page):
    history = page.locator("#history")
    history.locator("img").first.wait_for(state="visible", timeout=30_000)
    assert history.locator("img").count() >= 3  # the maps, grounded and edit results above
    captions = history.locator(".caption-label").all_inner_texts()
    assert "seed" in captions[0] and any(c.startswith("Attention maps") for c in captions)


def test_the_model_picker_refuses_an_unknown_model_and_switches_to_a_builtin(page):
    picker = page.locator("#model-picker input")
    picker.fill("no-such-model")
    page.locator("#model-load").click()
    page.wait_for_selector("text=is not a built-in", timeout=60_000)
    close_toasts(page)
    picker.fill("shapes-dit")
    page.locator("#model-load").click()
    page.wait_for_selector("text=model: shapes-dit", timeout=60_000)
    open_tab(page, "Attention maps")
    page.wait_for_function("() => document.querySelector('#maps-width input').step === '8'", timeout=30_000)
    picker.fill("shapes-t2i")
    page.locator("#model-load").click()
    page.wait_for_selector("text=model: shapes-t2i", timeout=60_000)
    close_toasts(page)
