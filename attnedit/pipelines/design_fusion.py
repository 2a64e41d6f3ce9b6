"""The DesignEdit sampling loop: key-masked sampling with latent blending, proximal guidance and layer fusion.

From x*_T of the inverted trajectory, each step hides the keys inside the hole (:class:`DesignKeyMask`, steps
``mask_from``..``mask_until``), takes one sampler step with the CFG pair, blends the latent outside the hole back
to the trajectory (z <- M z + (1 - M) x*_t, until ``blend_until``), and for t < ``proximal_below`` pulls the
unedited region toward it (proximal guidance). At ``fuse_at`` each object layer is pasted over the canvas,
translated: z <- (1 - T(M_l)) z + T(M_l) T(x*_l). Used by :class:`~attnedit.pipelines.design_edit.DesignEditor`.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F

from attnedit.core.install import install
from attnedit.methods.key_masking import DesignKeyMask
from attnedit.pipelines.design_canvas import Layer, shift
from attnedit.pipelines.design_inversion import EditModel, Run

DesignEditConfig = Any  # attnedit.pipelines.design_edit.DesignEditConfig (not imported: design_edit imports this module)

__all__ = ["denoise", "fuse", "guided_step"]


@torch.no_grad()
def denoise(model: EditModel, cfg: DesignEditConfig, latents: list[torch.Tensor], run: Run, hole: torch.Tensor | None,
            layers: list[Layer], refine: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sample the background from x*_T, key-masked and blended inside ``hole`` (h, w); fuse ``layers``.

    ``refine`` (h, w) only hides keys, for the first ``refine_until`` of the steps. Returns the final latent
    (1, C, h, w) and the edited region (1, 1, h, w) (None for a plain reconstruction).
    """
    start = cfg.start(cfg.mask_from)
    windows = [(hole, cfg.step(cfg.mask_until)), (refine, cfg.step(cfg.refine_until))]
    edits = [DesignKeyMask(mask=m, mode=cfg.mode, steps=(start, stop), kinds=model.kinds)
             for m, stop in windows if m is not None and stop > start]
    region = None if hole is None else (hole > 0).to(latents[0].dtype)[None, None]
    z = latents[0].clone()
    if region is not None and cfg.hole_noise > 0:  # small UNets carry the object through their convolutions
        fresh = torch.randn(z.shape, generator=torch.Generator().manual_seed(cfg.seed)).to(z)
        mixed = (1 - cfg.hole_noise) ** 0.5 * z + cfg.hole_noise ** 0.5 * fresh  # keeps unit variance
        z = region * mixed + (1 - region) * z
    with install(model.denoiser, *edits) if edits else nullcontext() as handle:
        branches = ("uncond", "cond") if cfg.guidance_scale > 1 else ("cond",)
        with handle.branches(*branches) if handle else nullcontext():
            for i in range(len(run.timesteps)):
                if layers and i == cfg.step(cfg.fuse_at):
                    z, region = fuse(z, layers, i, region)
                z = guided_step(model, cfg, z, run, latents[i + 1], region, i)
    return z, region


def guided_step(model: EditModel, cfg: DesignEditConfig, z: torch.Tensor, run: Run, target: torch.Tensor,
                region: torch.Tensor | None, i: int) -> torch.Tensor:
    """One sampler step with CFG, then latent blending and proximal guidance toward the reconstruction ``target``."""
    if cfg.guidance_scale > 1:  # the [uncond, cond] pair in one batch (FLUX, one pass, never gets here)
        out_u, out_c = model.predict(run, torch.cat([z, z]), i).chunk(2)
        out = out_u + cfg.guidance_scale * (out_c - out_u)
    else:
        out_u = out_c = out = model.predict(run, z, i)
    z = model.step(run, z, out, i)
    if region is None:
        return z
    if i < cfg.step(cfg.blend_until):
        z = region * z + (1 - region) * target
    if float(run.timesteps[i]) < cfg.proximal_below and cfg.proximal_strength > 0:
        change = (out_c - out_u).abs().mean(dim=1, keepdim=True)
        edited = (change > change.flatten().quantile(cfg.proximal_quantile)).float()
        edited = torch.maximum(F.max_pool2d(edited, 3, stride=1, padding=1), region)
        z = z - cfg.proximal_strength * (z - target) * (1 - edited)
    return z


def fuse(z: torch.Tensor, layers: list[Layer], i: int, region: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Paste each layer's translated latent over the canvas: z <- (1 - T(M)) z + T(M) T(x*_l)."""
    for layer in layers:
        mask = shift(layer.mask, *layer.offset)
        z = (1 - mask) * z + mask * shift(layer.latents[i], *layer.offset)
        region = mask if region is None else torch.maximum(region, mask)
    return z, region
