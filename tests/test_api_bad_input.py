"""Every bad input of the Python API is one clear error raised before any model compute (issue 25, item 4).

The table below is the list of inputs tried, one row per case: (id, call, expected, message regex). ``expected`` is
the exception a bad value must raise (one ``ValueError`` naming the argument and its value); ``Computes`` marks a
value that is accepted (converted) and reaches the model, which the tests replace by a tripwire so nothing runs.
Entry points: core.edits (Edit, KeyMask, BlockMask, HeadBlend, AttentionRecorder, mask_coverage), core.install,
methods.key_masking, methods.attention_maps, pipelines.design_edit (DesignEditConfig, DesignEditor),
pipelines.edit_pipeline (AttnEditPipeline call options) and pipelines.radial (generate_radial's arguments).
"""

from __future__ import annotations

import io
import struct
import types
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from attnedit.core.edits import (
    AttentionRecorder,
    BlockMask,
    HeadBlend,
    KeyMask,
    RecordedMap,
    mask_coverage,
    resize_mask,
)
from attnedit.core.families import Site
from attnedit.core.install import install
from attnedit.methods.attention_maps import token_heatmaps
from attnedit.methods.key_masking import DesignKeyMask, box_mask, check_mask, dilate_kernel, dilate_mask, load_mask
from attnedit.pipelines.design_edit import (
    Canvas,
    DesignEditConfig,
    DesignEditor,
    ObjectLayer,
    bbox,
    fit_to,
    paste_object,
)
from attnedit.pipelines.design_inversion import edit_model
from attnedit.pipelines.edit_pipeline import AttnEditPipeline, edit_pipeline_class
from attnedit.pipelines.radial import generate_radial

pytestmark = pytest.mark.usefixtures("one_thread")


class Computes(Exception):
    """Raised by the tripwire that replaces every model forward: the input got past validation."""


def _trip(*args, **kwargs):
    raise Computes("model compute reached")


NAN, INF = float("nan"), float("inf")
M = torch.zeros(48, 80, dtype=torch.bool)
M[8:20, 10:30] = True
BOX = (10, 8, 30, 20)  # (x0, y0, x1, y1) on the 80x48 picture


def picture(h: int = 48, w: int = 80) -> np.ndarray:
    ys, xs = np.mgrid[0:h, 0:w]
    return np.stack([xs * 255 // w, ys * 255 // h, (xs + ys) * 255 // (h + w)], axis=-1).astype(np.uint8)


def recorded(grid=(4, 4), text=3) -> RecordedMap:
    n = grid[0] * grid[1]
    probs = torch.softmax(torch.randn(1, 1, n, n + text), -1)
    return RecordedMap(Site("a", "joint", 0, 1), 0, ("cond",), probs, grid, slice(0, n), slice(0, n), slice(n, n + text))


def pixel_bomb(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header claims ``width`` x ``height`` pixels (what a 20000x20000 upload looks like to PIL)."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    start = data.index(b"IHDR")
    data[start + 4: start + 12] = struct.pack(">II", width, height)
    data[start + 17: start + 21] = struct.pack(">I", zlib.crc32(bytes(data[start: start + 17])))
    return bytes(data)


def nan_mask() -> np.ndarray:
    m = np.zeros((48, 80), np.float32)
    m[8:20, 10:30], m[0, 0] = 1.0, np.nan
    return m


def C(case_id: str, call, expected, match: str | None = None):
    return pytest.param(call, expected, match, id=case_id)


CASES = [
    # -- core.edits: KeyMask (mask conversions are accepted; everything else is refused) ----------------------
    C("KeyMask-list", lambda e: KeyMask(mask=[[0, 1], [1, 0]]), None),
    C("KeyMask-numpy-uint8", lambda e: KeyMask(mask=np.full((4, 4), 255, np.uint8)), None),
    C("KeyMask-PIL", lambda e: KeyMask(mask=Image.new("L", (8, 4))), None),
    C("KeyMask-0x0", lambda e: KeyMask(mask=torch.zeros(0, 0)), ValueError, r"mask= must be .*non-empty, got shape \(0, 0\)"),
    C("KeyMask-empty-list", lambda e: KeyMask(mask=[]), ValueError, r"mask= must be .*got shape \(0,\)"),
    C("KeyMask-1d", lambda e: KeyMask(mask=torch.zeros(8)), ValueError, r"mask= must be \(H, W\) or \(F, H, W\)"),
    C("KeyMask-4d", lambda e: KeyMask(mask=torch.zeros(1, 2, 4, 4)), ValueError, r"got shape \(1, 2, 4, 4\)"),
    C("KeyMask-nan", lambda e: KeyMask(mask=torch.tensor([[0.0, NAN]])), ValueError, r"mask= holds NaN"),
    C("KeyMask-inf", lambda e: KeyMask(mask=np.array([[0.0, INF]])), ValueError, r"mask= holds NaN or infinite"),
    C("KeyMask-above-1", lambda e: KeyMask(mask=torch.full((4, 4), 2.0)), ValueError, r"values must be in \[0, 1\]"),
    C("KeyMask-negative-int", lambda e: KeyMask(mask=torch.tensor([[-1, 0]])), ValueError, r"values must be in \[0, 1\]"),
    C("KeyMask-ragged-list", lambda e: KeyMask(mask=[[0, 1], [1]]), ValueError, r"mask= is a ragged"),
    C("KeyMask-path", lambda e: KeyMask(mask="mask.png"), ValueError, r"mask= must be a tensor, .*got str"),
    C("KeyMask-None", lambda e: KeyMask(mask=None), ValueError, r"got NoneType"),
    C("KeyMask-strings", lambda e: KeyMask(mask=np.array([["a"]])), ValueError, r"array of <U1"),
    C("KeyMask-threshold-nan", lambda e: KeyMask(mask=M, threshold=NAN), ValueError, r"threshold=nan must be"),
    C("KeyMask-threshold-1", lambda e: KeyMask(mask=M, threshold=1.0), ValueError, r"threshold=1.0 must be"),
    C("KeyMask-threshold-str", lambda e: KeyMask(mask=M, threshold="0.5"), ValueError, r"threshold='0.5' must be"),
    C("KeyMask-mode", lambda e: KeyMask(mask=M, mode="medium"), ValueError, r"mode='medium' must be"),
    # -- core.edits: Edit's where-filters ------------------------------------------------------------------------
    C("Edit-steps-scalar", lambda e: KeyMask(mask=M, steps=5), ValueError, r"steps=5 must be a window"),
    C("Edit-steps-triple", lambda e: KeyMask(mask=M, steps=(0, 1, 2)), ValueError, r"steps=\(0, 1, 2\) must be"),
    C("Edit-steps-float", lambda e: KeyMask(mask=M, steps=(0.5, 3)), ValueError, r"steps=\(0.5, 3\) must be"),
    C("Edit-steps-nan", lambda e: KeyMask(mask=M, steps=(0, NAN)), ValueError, r"steps=\(0, nan\) must be"),
    C("Edit-steps-reversed", lambda e: KeyMask(mask=M, steps=(5, 2)), ValueError, r"steps=\(5, 2\) must be"),
    C("Edit-steps-negative", lambda e: KeyMask(mask=M, steps=(-1, 2)), ValueError, r"steps=\(-1, 2\) must be"),
    C("Edit-layers-float", lambda e: KeyMask(mask=M, layers=1.5), ValueError, r"layers=1.5"),
    C("Edit-layers-negative", lambda e: KeyMask(mask=M, layers=[-1]), ValueError, r"layers=\[-1\] must be non-negative"),
    C("Edit-layers-bool", lambda e: KeyMask(mask=M, layers=True), ValueError, r"layers=\[True\] must be non-negative integers"),
    C("Edit-layers-empty", lambda e: KeyMask(mask=M, layers=()), ValueError, r"layers=\(\) selects nothing"),
    C("Edit-kinds-unknown", lambda e: KeyMask(mask=M, kinds="selff"), ValueError, r"kinds=\['selff'\] has unknown"),
    C("Edit-kinds-nested", lambda e: KeyMask(mask=M, kinds=[["self"]]), ValueError, r"kinds=\[\['self'\]\]"),
    C("Edit-branches-unknown", lambda e: KeyMask(mask=M, branches="cnd"), ValueError, r"branches=\['cnd'\] has unknown"),
    # -- core.edits: mask_coverage / resize_mask / BlockMask / HeadBlend / AttentionRecorder -----------------------
    C("mask_coverage-grid-0", lambda e: mask_coverage(M, (0, 0)), ValueError, r"grid=\(0, 0\) must be"),
    C("mask_coverage-mask-0x4", lambda e: mask_coverage(torch.ones(0, 4), (2, 2)), ValueError, r"mask= must be"),
    C("mask_coverage-aspect", lambda e: mask_coverage(torch.ones(4, 64), (8, 8)), ValueError, r"aspect ratio"),
    C("resize_mask-threshold-nan", lambda e: resize_mask(M, (6, 10), NAN), ValueError, r"threshold=nan"),
    C("BlockMask-size-0", lambda e: BlockMask(torch.ones(1, 1, dtype=torch.bool), 0, 4, 4), ValueError, r"block_size=0"),
    C("BlockMask-size-negative", lambda e: BlockMask(torch.ones(1, 1, dtype=torch.bool), -4, 4, 4), ValueError, r"block_size=-4"),
    C("BlockMask-list", lambda e: BlockMask([[True]], 4, 4, 4), ValueError, r"blocks= must be a bool tensor"),
    C("BlockMask-no-queries", lambda e: BlockMask(torch.ones(0, 1, dtype=torch.bool), 4, 0, 4), ValueError, r"num_queries=0"),
    C("BlockMask-shape", lambda e: BlockMask(torch.ones(2, 2, dtype=torch.bool), 4, 4, 4), ValueError, r"expected \(1, 1\)"),
    C("HeadBlend-strength-nan", lambda e: HeadBlend(strength=NAN), ValueError, r"strength=nan"),
    C("HeadBlend-strength-str", lambda e: HeadBlend(strength="0.5"), ValueError, r"strength='0.5'"),
    C("HeadBlend-strength-1.5", lambda e: HeadBlend(strength=1.5), ValueError, r"strength=1.5"),
    C("HeadBlend-heads-list", lambda e: HeadBlend(heads=[1, 2]), ValueError, r"heads=\[1, 2\]"),
    C("HeadBlend-heads-str-key", lambda e: HeadBlend(heads={"a": (0,)}), ValueError, r"heads=\{'a': \(0,\)\}"),
    C("HeadBlend-heads-negative", lambda e: HeadBlend(heads={1: (-1,)}), ValueError, r"heads=\{1: \(-1,\)\}"),
    C("HeadBlend-target", lambda e: HeadBlend(target="zero"), ValueError, r"target='zero'"),
    C("AttentionRecorder-queries", lambda e: AttentionRecorder(queries="images"), ValueError, r"queries='images' must be"),
    # -- core.install ----------------------------------------------------------------------------------------
    C("install-not-a-model", lambda e: install(object()), ValueError, r"object is neither a diffusers pipeline"),
    C("install-not-an-edit", lambda e: install(e.sd.unet, "KeyMask"), ValueError, r"edits\[0\]='KeyMask' is not an attnedit Edit"),
    C("install-edits-as-list", lambda e: install(e.sd.unet, [KeyMask(mask=M)]), ValueError, r"pass edits one by one: install\(pipe, \*edits\)"),
    C("install-backend", lambda e: install(e.sd.unet, backend="gpu"), ValueError, r"backend='gpu'"),
    C("install-layer-missing", lambda e: install(e.sd.unet, KeyMask(mask=M, layers={99})), ValueError, r"layer\(s\) \[99\]"),
    C("install-branches", lambda e: _branches(e, "cnd"), ValueError, r"branches \('cnd',\) must be"),
    # -- methods.key_masking -----------------------------------------------------------------------------------
    C("load_mask-missing-file", lambda e: load_mask("/no/such/mask.png", (48, 80)), ValueError, r"mask='/no/such/mask.png' cannot be read"),
    C("load_mask-not-an-image", lambda e: load_mask(e.files["text"], (48, 80)), ValueError, r"notes.txt' cannot be read as an image"),
    C("load_mask-truncated-png", lambda e: load_mask(e.files["truncated"], (48, 80)), ValueError, r"cut.png' cannot be read"),
    C("load_mask-pixel-bomb", lambda e: load_mask(e.files["bomb"], (48, 80)), ValueError, r"bomb.png' cannot be read as an image: .*decompression bomb"),
    C("load_mask-directory", lambda e: load_mask(e.files["dir"], (48, 80)), ValueError, r"cannot be read as an image"),
    C("load_mask-nan", lambda e: load_mask(nan_mask(), (48, 80)), ValueError, r"mask= holds NaN"),
    C("load_mask-float-0-255", lambda e: load_mask(np.full((48, 80), 200.0), (48, 80)), ValueError, r"values must be in \[0, 1\]"),
    C("load_mask-int-300", lambda e: load_mask(np.full((48, 80), 300, np.int16), (48, 80)), ValueError, r"values must be in \[0, 1\]"),
    C("load_mask-object-array", lambda e: load_mask(np.array([[None]]), (1, 1)), ValueError, r"array of object"),
    C("load_mask-4d", lambda e: load_mask(np.zeros((1, 2, 48, 80)), (48, 80)), ValueError, r"mask array has shape \(1, 2, 48, 80\)"),
    C("load_mask-None", lambda e: load_mask(None, (48, 80)), ValueError, r"mask of type NoneType"),
    C("load_mask-wrong-size", lambda e: load_mask(np.zeros((64, 64)), (48, 80)), ValueError, r"mask size 64x64 \(WxH\) does not match"),
    C("load_mask-size-scalar", lambda e: load_mask(BOX, 48), ValueError, r"size=48 must be \(H, W\)"),
    C("load_mask-size-0", lambda e: load_mask(np.zeros((0, 0)), (0, 0)), ValueError, r"size=\(0, 0\) must be"),
    C("load_mask-size-float", lambda e: load_mask(BOX, (48.5, 80)), ValueError, r"size=\(48.5, 80\) must be"),
    C("load_mask-threshold-nan", lambda e: load_mask(BOX, (48, 80), NAN), ValueError, r"threshold=nan must be"),
    C("load_mask-threshold-str", lambda e: load_mask(BOX, (48, 80), "0.5"), ValueError, r"threshold='0.5' must be"),
    C("load_mask-nested-list", lambda e: load_mask([[0, 1], [1, 0]], (2, 2)), ValueError, r"box=\[\[0, 1\], \[1, 0\]\] must be four integers"),
    C("box_mask-scalar", lambda e: box_mask(5, (48, 80)), ValueError, r"box=5 must be four integers"),
    C("box_mask-three", lambda e: box_mask((1, 2, 3), (48, 80)), ValueError, r"box=\(1, 2, 3\) must be four"),
    C("box_mask-normalised", lambda e: box_mask((0.1, 0.1, 0.5, 0.5), (48, 80)), ValueError, r"must be four integers .* in pixels"),
    C("box_mask-x1-before-x0", lambda e: box_mask((30, 8, 10, 20), (48, 80)), ValueError, r"0 <= x0 < x1 <= 80"),
    C("box_mask-outside", lambda e: box_mask((0, 0, 81, 20), (48, 80)), ValueError, r"box=\(0, 0, 81, 20\) must satisfy"),
    C("box_mask-negative", lambda e: box_mask((-5, 0, 10, 20), (48, 80)), ValueError, r"box=\(-5, 0, 10, 20\)"),
    C("box_mask-size", lambda e: box_mask(BOX, (48, -80)), ValueError, r"size=\(48, -80\) must be"),
    C("dilate_mask-negative", lambda e: dilate_mask(M, -1), ValueError, r"dilation=-1 must be"),
    C("dilate_mask-float", lambda e: dilate_mask(M, 1.5), ValueError, r"dilation=1.5 must be"),
    C("dilate_mask-nan", lambda e: dilate_mask(M, NAN), ValueError, r"dilation=nan must be"),
    C("dilate_mask-numpy", lambda e: dilate_mask(M.numpy(), 2), None),
    C("dilate_mask-3d", lambda e: dilate_mask(torch.zeros(2, 4, 4, dtype=torch.bool), 1), ValueError, r"mask= must be \(H, W\)"),
    C("dilate_kernel-huge", lambda e: dilate_kernel(M, 10**9), None),
    C("check_mask-list", lambda e: check_mask([[0, 1]]), ValueError, r"mask= must be a bool"),
    C("check_mask-empty", lambda e: check_mask(torch.zeros(4, 4, dtype=torch.bool)), ValueError, r"mask is empty"),
    C("DesignKeyMask-3d", lambda e: DesignKeyMask(mask=torch.zeros(2, 4, 4)), ValueError, r"DesignKeyMask takes an \(H, W\)"),
    C("DesignKeyMask-from-numpy", lambda e: DesignKeyMask.from_mask(M.numpy(), dilation=3), None),
    C("DesignKeyMask-from-list", lambda e: DesignKeyMask.from_mask("mask.png"), ValueError, r"mask= must be a tensor"),
    C("DesignKeyMask-dilation", lambda e: DesignKeyMask.from_mask(M, dilation=-3), ValueError, r"dilation=-3"),
    # -- methods.attention_maps --------------------------------------------------------------------------------
    C("token_heatmaps-empty", lambda e: token_heatmaps([]), ValueError, r"no recorded map has text keys"),
    C("token_heatmaps-not-maps", lambda e: token_heatmaps(["x"]), ValueError, r"maps\[0\]='x' is not a RecordedMap"),
    C("token_heatmaps-size-0", lambda e: token_heatmaps([recorded()], size=(0, 0)), ValueError, r"size=\(0, 0\) must be"),
    C("token_heatmaps-size-1d", lambda e: token_heatmaps([recorded()], size=(8,)), ValueError, r"size=\(8,\) must be"),
    # -- pipelines.design_edit: DesignEditConfig -------------------------------------------------------------------
    C("config-num_steps-1", lambda e: DesignEditConfig(num_steps=1), ValueError, r"num_steps=1 must be"),
    C("config-num_steps-float", lambda e: DesignEditConfig(num_steps=2.5), ValueError, r"num_steps=2.5 must be"),
    C("config-guidance-nan", lambda e: DesignEditConfig(guidance_scale=NAN), ValueError, r"guidance_scale=nan must be"),
    C("config-guidance-inf", lambda e: DesignEditConfig(guidance_scale=INF), ValueError, r"guidance_scale=inf must be"),
    C("config-guidance-0.5", lambda e: DesignEditConfig(guidance_scale=0.5), ValueError, r"guidance_scale=0.5 must be"),
    C("config-mask_from-nan", lambda e: DesignEditConfig(mask_from=NAN), ValueError, r"mask_from=nan must be"),
    C("config-mask_until-1.5", lambda e: DesignEditConfig(mask_until=1.5), ValueError, r"mask_until=1.5 must be"),
    C("config-fuse_at-str", lambda e: DesignEditConfig(fuse_at="0.8"), ValueError, r"fuse_at='0.8' must be"),
    C("config-threshold-1.5", lambda e: DesignEditConfig(threshold=1.5), ValueError, r"threshold=1.5 must be"),
    C("config-threshold-nan", lambda e: DesignEditConfig(threshold=NAN), ValueError, r"threshold=nan must be"),
    C("config-proximal_below-nan", lambda e: DesignEditConfig(proximal_below=NAN), ValueError, r"proximal_below=nan must be"),
    C("config-proximal_below-negative", lambda e: DesignEditConfig(proximal_below=-1), ValueError, r"proximal_below=-1 must be"),
    C("config-resolution-nan", lambda e: DesignEditConfig(resolution=NAN), ValueError, r"resolution=nan must be"),
    C("config-resolution-4", lambda e: DesignEditConfig(resolution=4), ValueError, r"resolution=4 must be"),
    C("config-hole_noise-2", lambda e: DesignEditConfig(hole_noise=2.0), ValueError, r"hole_noise=2.0 must be"),
    C("config-embedded_guidance-nan", lambda e: DesignEditConfig(embedded_guidance=NAN), ValueError, r"embedded_guidance=nan must be"),
    C("config-seed-str", lambda e: DesignEditConfig(seed="1"), ValueError, r"seed='1' must be"),
    C("config-prompt-None", lambda e: DesignEditConfig(prompt=None), ValueError, r"prompt=None must be"),
    C("config-inversion_iterations", lambda e: DesignEditConfig(inversion_iterations=-1), ValueError, r"inversion_iterations=-1"),
    C("config-mode", lambda e: DesignEditConfig(mode="both"), ValueError, r"mode='both' must be"),
    C("config-dilation_units", lambda e: DesignEditConfig(dilation_units="mm"), ValueError, r"dilation_units='mm'"),
    C("edit_model-num_steps-0", lambda e: edit_model(e.sd, 0), ValueError, r"num_steps=0 must be an integer >= 1"),
    C("edit_model-prompt-None", lambda e: edit_model(e.sd, 4, None), ValueError, r"prompt=None must be a string"),
    C("Canvas.fit-size-0", lambda e: Canvas.fit((0, 0), 128, 8), ValueError, r"size=\(0, 0\) must be"),
    C("Canvas.fit-long_side-nan", lambda e: Canvas.fit((48, 80), NAN, 8), ValueError, r"long_side=nan must be an integer"),
    C("bbox-empty", lambda e: bbox(torch.zeros(4, 4, dtype=torch.bool)), ValueError, r"mask is empty"),
    C("paste_object-scale-inf", lambda e: paste_object(torch.zeros(3, 48, 80), M, scale=INF), ValueError, r"scale=inf must be"),
    C("paste_object-flip", lambda e: paste_object(torch.zeros(3, 48, 80), M, flip="x"), ValueError, r"flip='x' must be"),
    C("fit_to-size-0", lambda e: fit_to(torch.zeros(3, 48, 80), M, (0, 80)), ValueError, r"size=\(0, 80\) must be"),
    C("DesignEditor-not-a-pipe", lambda e: DesignEditor(object()), ValueError, r"needs a pipeline with a unet"),
    C("DesignEditor-config-type", lambda e: DesignEditor(e.sd, {"num_steps": 4}), ValueError, r"config=\{'num_steps': 4\} must be"),
    # -- pipelines.design_edit: DesignEditor operations (the model is a tripwire) -----------------------------------
    C("remove-accepted", lambda e: e.editor.remove(picture(), BOX, dilation=2), Computes),
    C("remove-image-missing", lambda e: e.editor.remove("/no/such/image.png", BOX), ValueError, r"image='/no/such/image.png' cannot be read"),
    C("remove-image-not-an-image", lambda e: e.editor.remove(e.files["text"], BOX), ValueError, r"notes.txt' cannot be read"),
    C("remove-image-truncated", lambda e: e.editor.remove(e.files["truncated"], BOX), ValueError, r"cut.png' cannot be read"),
    C("remove-image-pixel-bomb", lambda e: e.editor.remove(e.files["bomb"], BOX), ValueError, r"bomb.png' cannot be read: .*decompression bomb"),
    C("remove-image-float", lambda e: e.editor.remove(picture() / 255.0, BOX), ValueError, r"image must be a path, PIL image or uint8"),
    C("remove-image-0x0", lambda e: e.editor.remove(np.zeros((0, 0, 3), np.uint8), BOX), ValueError, r"image of size 0x0"),
    C("remove-image-gray-accepted", lambda e: e.editor.remove(picture()[..., 0], BOX), Computes),
    C("remove-image-rgba-accepted", lambda e: e.editor.remove(np.dstack([picture(), picture()[..., :1]]), BOX), Computes),
    C("remove-image-two-channels", lambda e: e.editor.remove(picture()[..., :2], BOX), ValueError, r"got an array of shape \(48, 80, 2\) and dtype uint8"),
    C("remove-image-tensor", lambda e: e.editor.remove(torch.zeros(3, 48, 80), BOX), ValueError, r"uint8 \(H, W, 3\) array, got Tensor"),
    C("remove-mask-nan", lambda e: e.editor.remove(picture(), nan_mask()), ValueError, r"mask= holds NaN"),
    C("remove-mask-size", lambda e: e.editor.remove(picture(), np.zeros((64, 64))), ValueError, r"mask size 64x64"),
    C("remove-mask-empty", lambda e: e.editor.remove(picture(), np.zeros((48, 80), np.uint8)), ValueError, r"mask is empty"),
    C("remove-mask-full", lambda e: e.editor.remove(picture(), np.ones((48, 80), bool)), ValueError, r"mask covers the whole"),
    C("remove-mask-empty-list", lambda e: e.editor.remove(picture(), []), ValueError, r"box=\[\] must be four"),
    C("remove-box-outside", lambda e: e.editor.remove(picture(), (0, 0, 90, 10)), ValueError, r"box=\(0, 0, 90, 10\)"),
    C("remove-dilation-negative", lambda e: e.editor.remove(picture(), BOX, dilation=-1), ValueError, r"dilation=-1 must be"),
    C("remove-dilation-float", lambda e: e.editor.remove(picture(), BOX, dilation=2.5), ValueError, r"dilation=2.5 must be"),
    C("remove-refine-empty", lambda e: e.editor.remove(picture(), BOX, refine=np.zeros((48, 80))), ValueError, r"refine is empty"),
    C("move-outside", lambda e: e.editor.move(picture(), BOX, dx=60, dy=0), ValueError, r"move dx=60, dy=0 takes the object"),
    C("move-dx-nan", lambda e: e.editor.move(picture(), BOX, dx=NAN, dy=0), ValueError, r"dx=nan must be an integer"),
    C("move-dx-inf", lambda e: e.editor.move(picture(), BOX, dx=INF, dy=0), ValueError, r"dx=inf must be an integer"),
    C("move-dy-fraction", lambda e: e.editor.move(picture(), BOX, dx=0, dy=1.5), ValueError, r"dy=1.5 must be an integer"),
    C("move-object_dilation", lambda e: e.editor.move(picture(), BOX, 4, 4, object_dilation=-2), ValueError, r"object_dilation=-2"),
    C("resize-inf", lambda e: e.editor.resize(picture(), BOX, scale=INF), ValueError, r"scale=inf must be"),
    C("resize-nan", lambda e: e.editor.resize(picture(), BOX, scale=NAN), ValueError, r"scale=nan must be"),
    C("resize-0", lambda e: e.editor.resize(picture(), BOX, scale=0), ValueError, r"scale=0 must be"),
    C("resize-negative", lambda e: e.editor.resize(picture(), BOX, scale=-1.0), ValueError, r"scale=-1.0 must be"),
    C("resize-str", lambda e: e.editor.resize(picture(), BOX, scale="2"), ValueError, r"scale='2' must be"),
    C("resize-too-big", lambda e: e.editor.resize(picture(), BOX, scale=4.0), ValueError, r"scale=4.0 makes the object"),
    C("resize-dilation", lambda e: e.editor.resize(picture(), BOX, 1.2, dilation=NAN), ValueError, r"dilation=nan must be"),
    C("flip-direction", lambda e: e.editor.flip(picture(), BOX, "x"), ValueError, r"direction='x' must be"),
    C("flip-object_dilation", lambda e: e.editor.flip(picture(), BOX, object_dilation=1.5), ValueError, r"object_dilation=1.5"),
    C("zoom_out-1", lambda e: e.editor.zoom_out(picture(), 1.0), ValueError, r"scale=1.0 must be in \(0, 1\)"),
    C("zoom_out-nan", lambda e: e.editor.zoom_out(picture(), NAN), ValueError, r"scale=nan must be in \(0, 1\)"),
    C("zoom_out-dilation", lambda e: e.editor.zoom_out(picture(), 0.5, dilation=-3), ValueError, r"dilation=-3 must be"),
    C("pan-amount-0", lambda e: e.editor.pan(picture(), "left", 0), ValueError, r"amount=0 must be an integer in 1..79"),
    C("pan-amount-float", lambda e: e.editor.pan(picture(), "up", 8.0), ValueError, r"amount=8.0 must be an integer"),
    C("pan-amount-too-big", lambda e: e.editor.pan(picture(), "down", 48), ValueError, r"amount=48 must be an integer in 1..47"),
    C("pan-direction", lambda e: e.editor.pan(picture(), "sideways", 8), ValueError, r"direction='sideways'"),
    C("pan-dilation", lambda e: e.editor.pan(picture(), "left", 8, dilation="3"), ValueError, r"dilation='3' must be"),
    C("compose-accepted", lambda e: e.editor.compose(picture(), [(picture(32, 32), (4, 4, 12, 12), 2, 0)]), Computes),
    C("compose-no-layers", lambda e: e.editor.compose(picture(), []), ValueError, r"layers=\[\] gives nothing"),
    C("compose-layers-None", lambda e: e.editor.compose(picture(), None), ValueError, r"layers=None must be a list"),
    C("compose-layers-str", lambda e: e.editor.compose(picture(), "cat.png"), ValueError, r"layers='cat.png' must be a list"),
    C("compose-layer-short", lambda e: e.editor.compose(picture(), [(picture(),)]), ValueError, r"layers\[0\]=.* must be an ObjectLayer"),
    C("compose-layer-int", lambda e: e.editor.compose(picture(), [5]), ValueError, r"layers\[0\]=5 must be an ObjectLayer"),
    C("compose-layer-long", lambda e: e.editor.compose(picture(), [(picture(), BOX, 0, 0, 9)]), ValueError, r"layers\[0\]="),
    C("compose-layer-dx-float", lambda e: e.editor.compose(picture(), [ObjectLayer(picture(), BOX, dx=1.5)]), ValueError, r"layers\[0\].dx=1.5"),
    C("compose-layer-outside", lambda e: e.editor.compose(picture(), [(picture(), BOX, 78, 0)]), ValueError, r"move dx=78"),
    C("compose-layer-missing-image", lambda e: e.editor.compose(picture(), [("/no/x.png", BOX)]), ValueError, r"image='/no/x.png' cannot be read"),
    C("compose-layer-mask-empty", lambda e: e.editor.compose(picture(), [(picture(), np.zeros((48, 80)))]), ValueError, r"layers\[0\].mask is empty"),
    C("compose-remove-empty", lambda e: e.editor.compose(picture(), [(picture(), BOX)], remove=np.zeros((48, 80))), ValueError, r"remove is empty"),
    # -- pipelines.edit_pipeline: AttnEditPipeline call options (the stock call is a tripwire) ---------------------
    C("call-key_mask-list", lambda e: e.pipe(key_mask=[[0, 1], [1, 0]]), Computes),
    C("call-key_mask-0x0", lambda e: e.pipe(key_mask=np.zeros((0, 0))), ValueError, r"key_mask= must be .*non-empty"),
    C("call-key_mask-nan", lambda e: e.pipe(key_mask=np.array([[0.0, NAN]])), ValueError, r"key_mask= holds NaN"),
    C("call-key_mask-str", lambda e: e.pipe(key_mask="mask.png"), ValueError, r"key_mask= must be a tensor"),
    C("call-key_mask-video-on-image", lambda e: e.pipe(key_mask=torch.zeros(3, 8, 8)), ValueError, r"key_mask= of shape \(3, 8, 8\) is a video mask"),
    C("call-key_mask-aspect", lambda e: e.pipe(key_mask=torch.zeros(4, 64), height=64, width=64), ValueError, r"key_mask of size \(4, 64\) does not have the aspect ratio"),
    C("call-key_mask-layers", lambda e: e.pipe(key_mask=KeyMask(mask=torch.ones(64, 64), layers={99})), ValueError, r"layer\(s\) \[99\]"),
    C("call-radial-on-image", lambda e: e.pipe(radial=True), ValueError, r"radial= needs a video"),
    C("call-edits-int", lambda e: e.pipe(edits=5), ValueError, r"edits=5 must be"),
    C("call-edits-str", lambda e: e.pipe(edits=["x"]), ValueError, r"edits= takes attnedit Edit"),
    C("call-edit_backend", lambda e: e.pipe(edit_backend="gpu"), ValueError, r"backend='gpu'"),
    C("call-pag_scale-alone", lambda e: e.pipe(pag_scale=2.0), ValueError, r"pag_scale given without pag_heads"),
    C("call-pag_options-str", lambda e: e.pipe(pag_heads="L0", pag_options="steps"), ValueError, r"pag_options='steps' must be a dict"),
    C("call-refocus_options-alone", lambda e: e.pipe(refocus_options={}), ValueError, r"refocus_options given without layout"),
    C("call-layout-str", lambda e: e.pipe(layout="a cat"), ValueError, r"layout='a cat' must be"),
    C("from_pipe-object", lambda e: AttnEditPipeline.from_pipe(object()), ValueError, r"from_pipe needs a diffusers pipeline"),
    C("from_pipe-custom", lambda e: AttnEditPipeline.from_pipe(e.sd, custom_pipeline="x"), ValueError, r"custom_pipeline="),
    C("edit_pipeline_class-int", lambda e: edit_pipeline_class(int), ValueError, r"'int' is not a diffusers pipeline class"),
    # -- pipelines.radial: generate_radial's own arguments ----------------------------------------------------------
    C("generate_radial-object", lambda e: generate_radial(object(), "x"), ValueError, r"pipe=.* is not a video diffusion pipeline"),
    C("generate_radial-image-pipe", lambda e: generate_radial(e.sd, "x"), ValueError, r"needs a video diffusion transformer .* sd15|unet"),
    C("generate_radial-radial-int", lambda e: generate_radial(e.sd, "x", radial=5), ValueError, r"radial=5 must be a dict"),
    C("generate_radial-unknown-field", lambda e: generate_radial(e.sd, "x", radial={"decay": 0.9, "speed": 2}), ValueError, r"radial= names \['speed'\], which are not"),
    C("generate_radial-preset-list", lambda e: generate_radial(e.sd, "x", preset=["wan"]), ValueError, r"preset=\['wan'\] must be a preset name"),
    C("generate_radial-backend", lambda e: generate_radial(e.sd, "x", backend="gpu"), ValueError, r"backend='gpu'"),
]


def _branches(env, *names):
    with install(env.sd.unet) as handle, handle.branches(*names):
        pass


@pytest.fixture(scope="module")
def env(tiny_pipe, tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad_input")
    (folder / "notes.txt").write_text("not an image")
    buffer = io.BytesIO()
    Image.fromarray(picture()).save(buffer, format="PNG")
    (folder / "cut.png").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (folder / "dir.png").mkdir()
    (folder / "bomb.png").write_bytes(pixel_bomb(20000, 20000))
    files = {name: str(folder / f"{stem}") for name, stem in
             (("text", "notes.txt"), ("truncated", "cut.png"), ("dir", "dir.png"), ("bomb", "bomb.png"))}
    sd = tiny_pipe("sd15")
    editor = DesignEditor(sd, DesignEditConfig(num_steps=4, resolution=128))
    return types.SimpleNamespace(sd=sd, pipe=AttnEditPipeline.from_pipe(sd), editor=editor, files=files)


@pytest.fixture
def tripwire(env, monkeypatch):
    """Every model forward raises Computes: a case that reaches the model passed validation."""
    for name in ("encode", "decode", "invert", "predict"):
        monkeypatch.setattr(env.editor.model, name, _trip)
    monkeypatch.setattr(type(env.sd), "__call__", _trip)
    for module in (env.sd.unet, env.sd.text_encoder, env.sd.vae):
        monkeypatch.setattr(module, "forward", _trip)


@pytest.mark.parametrize("call, expected, match", CASES)
def test_bad_input(env, tripwire, call, expected, match):
    if expected is None:
        result = call(env)
        if hasattr(result, "remove"):
            result.remove()
        return
    with pytest.raises(expected, match=match) as caught:
        call(env)
    assert type(caught.value) is expected, f"{type(caught.value).__name__}: {caught.value}"


def test_accepted_masks_are_converted():
    """Masks given as lists, uint8 arrays and PIL images become the tensors they stand for."""
    assert torch.equal(KeyMask(mask=[[0, 1], [1, 0]]).mask, torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    assert torch.equal(KeyMask(mask=np.full((2, 3), 255, np.uint8)).mask, torch.ones(2, 3))
    assert tuple(KeyMask(mask=Image.new("L", (8, 4), 255)).mask.shape) == (4, 8)
    bool_mask = torch.zeros(4, 4, dtype=torch.bool)
    assert KeyMask(mask=bool_mask).mask is bool_mask  # tensors in [0, 1] are kept as given
    assert dilate_kernel(M, 10**9).all() and not dilate_kernel(torch.zeros(4, 4, dtype=torch.bool), 10**9).any()
    assert torch.equal(dilate_mask(M.numpy(), 2), dilate_mask(M, 2))
