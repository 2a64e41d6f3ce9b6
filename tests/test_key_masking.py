"""DesignEdit key masking: mask input, dilation, per-grid key vectors, exactness, zero weight on masked keys."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from attnedit import AttentionRecorder, install
from attnedit.core.edits import resize_mask
from attnedit.methods.key_masking import DesignKeyMask, box_mask, check_mask, dilate_mask, load_mask
from attnedit.models import zoo

SIZE = (64, 64)


def latents(pipe, *edits, backend="auto"):
    kwargs = {**zoo.call_kwargs("sd15"), "output_type": "latent"}
    generator = torch.Generator("cpu").manual_seed(0)
    if not edits:
        return pipe(**kwargs, generator=generator)[0]
    with install(pipe, *edits, backend=backend):
        return pipe(**kwargs, generator=generator)[0]


# -- mask input ----------------------------------------------------------------------------------------------
def test_mask_sources_agree(tmp_path):
    box = (8, 16, 40, 48)
    expected = torch.zeros(SIZE, dtype=torch.bool)
    expected[16:48, 8:40] = True
    array = expected.numpy().astype(np.uint8) * 255
    path = tmp_path / "mask.png"
    Image.fromarray(array).save(path)
    sources = [box, list(box), array, array > 0, Image.fromarray(array), str(path), path, torch.from_numpy(array > 0),
               np.stack([array] * 3, axis=-1), array[None].astype(np.float32) / 255]
    for source in sources:
        assert torch.equal(load_mask(source, SIZE), expected), type(source)


def test_threshold_is_strictly_greater_on_unit_scale():
    array = np.array([[127, 128], [0, 255]], dtype=np.uint8)  # 127/255 < 0.5 < 128/255
    assert load_mask(array, (2, 2)).tolist() == [[False, True], [False, True]]
    assert load_mask(array, (2, 2), threshold=0.0).tolist() == [[True, True], [False, True]]
    floats = np.array([[0.5, 0.51]], dtype=np.float32)
    assert load_mask(floats, (1, 2)).tolist() == [[False, True]]


@pytest.mark.parametrize(
    "mask, match",
    [
        (np.zeros((32, 64)), r"mask size 64x32 \(WxH\) does not match the image size 64x64"),
        ((0, 0, 65, 10), r"box=\(0, 0, 65, 10\) must satisfy 0 <= x0 < x1 <= 64"),
        ((10, 0, 10, 10), r"box=.*x0 < x1"),
        ((0.5, 0, 10, 10), r"box=.*four integers"),
        ("/nonexistent/mask.png", r"mask='/nonexistent/mask.png' cannot be read"),
        (object(), r"mask of type object is not a path"),
        (np.zeros((2, 3, 64, 64)), r"mask array has shape \(2, 3, 64, 64\)"),
    ],
)
def test_bad_masks_raise(mask, match):
    with pytest.raises(ValueError, match=match):
        load_mask(mask, SIZE)


def test_unreadable_file_and_threshold(tmp_path):
    path = tmp_path / "broken.png"
    path.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="broken.png' cannot be read as an image"):
        load_mask(path, SIZE)
    with pytest.raises(ValueError, match=r"threshold=1.0 must be in \[0, 1\)"):
        load_mask((0, 0, 4, 4), SIZE, threshold=1.0)


def test_empty_and_full_masks_are_rejected():
    with pytest.raises(ValueError, match="mask is empty"):
        check_mask(torch.zeros(4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="hole covers the whole image"):
        check_mask(torch.ones(4, 4, dtype=torch.bool), "hole")
    assert check_mask(box_mask((0, 0, 2, 2), (4, 4))).sum() == 4


def test_dilation_matches_a_square_neighbourhood():
    mask = torch.zeros(20, 20, dtype=torch.bool)
    mask[9, 5] = mask[3:5, 14] = True
    grown = dilate_mask(mask, 3)
    ys, xs = torch.meshgrid(torch.arange(20), torch.arange(20), indexing="ij")
    expected = torch.zeros_like(mask)
    for y, x in mask.nonzero().tolist():
        expected |= ((ys - y).abs() <= 3) & ((xs - x).abs() <= 3)
    assert torch.equal(grown, expected)
    assert torch.equal(dilate_mask(mask, 0), mask)
    with pytest.raises(ValueError, match=r"dilation=-1 must be a non-negative integer"):
        dilate_mask(mask, -1)


# -- the edit ------------------------------------------------------------------------------------------------------
def cell_share_reference(mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """The share of each grid cell inside the mask, by explicit loops (cells as in adaptive average pooling)."""
    (H, W), (h, w) = mask.shape, grid
    out = torch.zeros(h, w)
    for i in range(h):
        for j in range(w):
            y0, y1 = (i * H) // h, -(-((i + 1) * H) // h)
            x0, x1 = (j * W) // w, -(-((j + 1) * W) // w)
            out[i, j] = mask[y0:y1, x0:x1].float().mean()
    return out


def test_key_share_per_grid_matches_a_dense_cell_reference(tiny_pipe):
    """Each key gets the share of its cell inside the mask, fractional at the edges (the original's resize)."""
    mask = box_mask((0, 0, 20, 36), SIZE)  # not aligned to the 8x8 or 4x4 grids
    edit = DesignKeyMask.from_mask(mask, dilation=0)
    recorder = AttentionRecorder(kinds={"self"})
    latents(tiny_pipe("sd15"), edit, recorder)
    grids = {m.grid for m in recorder.maps}
    assert grids == {(8, 8), (4, 4)}
    for grid in grids:
        share = next(v for k, v in edit._grids.items() if k[0] == grid)
        assert share.shape == (grid[0] * grid[1],)
        torch.testing.assert_close(share, cell_share_reference(mask, grid).flatten())
        assert ((share > 0) & (share < 1)).any()  # edge cells are fractional
        for m in (r for r in recorder.maps if r.grid == grid):  # hard mode: any covered key is hidden
            assert m.probs[1][..., share > 0].abs().max() == 0


def test_thin_and_unaligned_masks_keep_keys_on_every_grid(tiny_pipe):
    """A 2 px bar vanishes from coarse grids under a > 50% rule; with any-overlap it hides keys on every grid."""
    mask = torch.zeros(SIZE, dtype=torch.bool)
    mask[5:59, 37:39] = True  # 2 px wide, straddling cells of every grid
    for grid in ((8, 8), (4, 4), (2, 2)):
        assert not resize_mask(mask.float(), grid, 0.5).any()  # the old rule: no key left
    edit, recorder = DesignKeyMask(mask=mask), AttentionRecorder(kinds={"self"}, branches={"cond"})
    latents(tiny_pipe("sd15"), edit, recorder)
    assert {m.grid for m in recorder.maps} == {(8, 8), (4, 4)}
    for m in recorder.maps:
        hidden = cell_share_reference(mask, m.grid).flatten() > 0
        assert 0 < int(hidden.sum()) < hidden.numel()
        assert m.probs[..., hidden].abs().max() == 0 and m.probs[..., ~hidden].sum(-1).min() > 0.99
    soft = DesignKeyMask(mask=mask, mode="soft")  # soft: fractional scales, fast path equals the dense reference
    torch.testing.assert_close(latents(tiny_pipe("sd15"), soft), latents(tiny_pipe("sd15"), soft, backend="reference"),
                               rtol=1e-4, atol=1e-4)


def test_empty_mask_is_exactly_no_edit(tiny_pipe):
    pipe = tiny_pipe("sd15")
    empty = DesignKeyMask(mask=torch.zeros(SIZE))
    assert torch.equal(latents(pipe, empty), latents(pipe))
    assert torch.equal(latents(pipe, DesignKeyMask(mask=torch.zeros(SIZE), mode="soft")), latents(pipe))


def test_hard_mode_gives_masked_keys_zero_weight_on_cond_rows_only(tiny_pipe):
    pipe = tiny_pipe("sd15")
    mask = box_mask((0, 0, 32, 32), SIZE)
    edit = DesignKeyMask(mask=mask)
    recorder = AttentionRecorder(kinds={"self"}, mean_heads=False)
    reference = latents(pipe, edit, recorder)
    assert recorder.maps
    for m in recorder.maps:
        assert m.branches == ("uncond", "cond")
        hidden = resize_mask(mask.float(), m.grid).flatten()
        uncond, cond = m.probs[0], m.probs[1]
        assert cond[..., hidden].abs().max() == 0.0
        assert torch.allclose(cond.sum(-1), torch.ones(()), atol=1e-5)
        assert uncond[..., hidden].sum(-1).min() > 0.01  # the unconditional branch is untouched
    fast = latents(pipe, edit)  # native kernel with the boolean key mask
    assert (fast - reference).abs().max() <= 1e-4
    assert (fast - latents(pipe)).abs().max() > 1e-3


def test_soft_mode_is_paper_formula(tiny_pipe):
    """(1 - M) K: every masked key has logit 0, so all masked keys of a query share one nonzero weight."""
    pipe = tiny_pipe("sd15")
    mask = box_mask((0, 0, 32, 32), SIZE)
    recorder = AttentionRecorder(kinds={"self"}, mean_heads=False, branches={"cond"})
    latents(pipe, DesignKeyMask(mask=mask, mode="soft"), recorder)
    for m in recorder.maps:
        masked = m.probs[..., resize_mask(mask.float(), m.grid).flatten()]
        assert masked.min() > 0
        assert torch.allclose(masked, masked[..., :1].expand_as(masked), rtol=1e-4, atol=0)


def test_steps_and_layers_are_respected(tiny_pipe):
    pipe = tiny_pipe("sd15")
    mask = box_mask((0, 0, 32, 32), SIZE)
    recorder = AttentionRecorder(kinds={"self"}, mean_heads=False, branches={"cond"})
    latents(pipe, DesignKeyMask(mask=mask, steps=(1, 2), layers={0}), recorder)
    for m in recorder.maps:
        zero = m.probs[..., resize_mask(mask.float(), m.grid).flatten()].abs().max() == 0
        assert bool(zero) == (m.step == 1 and m.site.layer == 0), (m.step, m.site.layer)


def test_bad_edit_arguments():
    with pytest.raises(ValueError, match=r"mode='medium' must be 'hard' or 'soft'"):
        DesignKeyMask(mask=torch.zeros(SIZE), mode="medium")
    with pytest.raises(ValueError, match=r"branches=\['cnd'\] has unknown entries"):
        DesignKeyMask(mask=torch.zeros(SIZE), branches={"cnd"})
    with pytest.raises(ValueError, match=r"DesignKeyMask takes an \(H, W\) image mask, got shape \(2, 64, 64\)"):
        DesignKeyMask(mask=torch.zeros(2, *SIZE))
    assert "DesignKeyMask(mask=(64, 64), mode='hard'" in repr(DesignKeyMask(mask=torch.zeros(SIZE)))
