"""DesignEdit on Stable Diffusion 1.5 / SDXL, SD3 / SD3.5 and FLUX.1: remove, move, resize, flip, zoom out, pan, compose.

Implements the training-free editing pipeline of Jia et al., "DesignEdit: Multi-Layered Latent Decomposition
and Fusion for Unified & Accurate Image Editing" (arXiv:2403.14487, AAAI 2025):

1. *Decomposition.* Each image is inverted (empty prompt, conditional only), keeping every intermediate latent
   x*_t: DDIM on the UNets, the Euler inversion of the velocity ODE on the flow-matching transformers
   (``design_inversion``). The background is inpainted by key masking (:class:`~attnedit.methods.key_masking.DesignKeyMask`)
   on the conditional branch for steps ``mask_from``..``mask_until`` of the run, with latent blending
   z <- M z + (1 - M) x*_t against the reconstruction and proximal guidance for t < 400:
   z <- z - s (z - x*_t)(1 - M_edit), M_edit = dilate(|f_c - f_u| > q-quantile) OR M.
2. *Fusion.* After ``fuse_at`` of the steps each object layer (an image inverted on its own, its object selected
   by its mask) is pasted onto the background latent, translated by integer latent offsets:
   z <- (1 - T(M_l)) z + T(M_l) T(x*_l); the remaining steps denoise the canvas freely to harmonize it.

On SD3/SD3.5 the key mask acts on the image keys of every joint block (and SD3.5's image self-attention), text
keys untouched, amplified by the CFG pair as in the paper. FLUX.1-dev is guidance-distilled: it has no
unconditional branch, so there is nothing for CFG to amplify the mask against. There removal follows KV-Edit
(Zhu et al. 2025): a hard mask (hidden keys get exactly zero weight) on every double- and single-stream block in
one pass, the hole re-initialised with fresh noise (``hole_noise=1``), and the background held on its inverted
trajectory by latent blending, so its keys and values are those of the inversion (what KV-Edit caches).

Deviations from the released code: the source reconstruction slot and object slots are replaced by the inverted
trajectories themselves (same targets, fewer rows per step); images keep their aspect ratio (resized so the long
side is the model's resolution, padded to the model's multiple, cropped and resized back); dilation is a
parameter; the vertical move direction is image convention (+dy = down); outside the edited region the source
pixels are pasted back (``paste_back``); inversion may be refined to a fixed point (``inversion_iterations``).
The prompt is empty for both CFG branches, so guidance amplifies only the key-mask difference.

Modules: inversion and one sampler step per model family in ``design_inversion``, the sampling loop with
blending and fusion in ``design_fusion``, geometry in ``design_canvas``; the operations are here.

>>> editor = DesignEditor(pipe)                               # a loaded SD / SDXL / SD3 / FLUX pipeline  # doctest: +SKIP
>>> out = editor.remove("photo.png", "mask.png")              # PIL image of the source size  # doctest: +SKIP
>>> out = editor.move(image, (40, 60, 120, 160), dx=80, dy=0)  # a box stands in for a mask  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from attnedit.core.checks import check_int, check_real, is_int
from attnedit.methods.key_masking import MaskLike, check_mask, dilate_kernel, dilate_mask, load_mask
from attnedit.pipelines.design_canvas import (
    Canvas,
    Layer,
    ObjectLayer,
    bbox,
    check_move,
    check_pixels,
    fit_to,
    load_image,
    object_layers,
    paste_object,
    shift,
    to_pil,
)
from attnedit.pipelines.design_fusion import denoise
from attnedit.pipelines.design_inversion import EditModel, Run, ddim_move, edit_model

__all__ = [
    "Canvas", "DesignEditConfig", "DesignEditor", "ObjectLayer", "bbox", "ddim_move", "fit_to", "load_image",
    "paste_object", "shift", "to_pil",
]

PAN_DIRECTIONS = ("left", "right", "up", "down")
DILATION_UNITS = ("paper", "radius")
# (CFG pair weight, share of fresh noise in the hole) when the config leaves them None: CFG models, guidance-distilled ones
DEFAULTS, DISTILLED_DEFAULTS = (7.5, 0.0), (1.0, 1.0)


@dataclass(frozen=True)
class DesignEditConfig:
    """Sampling settings (paper defaults); step windows are fractions of ``num_steps`` (0.8 of 50 = 40 steps).

    ``dilation_units="paper"``: an operation's ``dilation`` is the paper's ``attend_scale``, a square kernel of that
    many pixels at the model's native resolution (SDXL/SD3/FLUX 1024 px, SD 1.5 512 px), scaled to the image: 20 px
    grows a 24 px box to 43 px at native size. ``"radius"``: grow by ``dilation`` source pixels on every side (a 24
    px box becomes 64 px at 20). ``guidance_scale`` / ``hole_noise`` None take the family's default (SD, SDXL, SD3:
    CFG 7.5, no hole noise, as the paper; FLUX: one pass, fresh noise in the hole, as KV-Edit).
    """

    num_steps: int = 50
    guidance_scale: float | None = None
    mode: str = "hard"  # key masking: "hard" (-inf) or "soft" (paper's (1 - M) K, fractional at mask edges)
    mask_from: float = 0.02  # key masking covers steps ceil(0.02 n)..(0.8 n - 1): 1-39 of 50, as the released code
    mask_until: float = 0.8
    refine_until: float = 0.5  # key masking of the optional refine mask (remove(..., refine=...))
    blend_until: float = 0.82
    fuse_at: float = 0.84
    proximal_below: int = 400  # timestep below which proximal guidance acts
    proximal_strength: float = 0.1
    proximal_quantile: float = 0.75
    threshold: float = 0.5  # binarization of input masks (values scaled to [0, 1])
    dilation_units: str = "paper"
    resolution: int | None = None  # long side in pixels; None: the model's native size
    prompt: str = ""
    paste_back: bool = True  # outside the edited region (grown and feathered by 8 px), keep the source pixels
    inversion_iterations: int = 0  # fixed-point refinements per inversion step (0: plain DDIM / Euler, as the papers)
    hole_noise: float | None = None  # share of fresh noise mixed into the inverted x_T inside the hole
    embedded_guidance: float = 1.0  # FLUX's distilled guidance, the same for inversion and sampling
    seed: int = 0  # of the hole noise
    dilation: int | None = None  # mask growth of remove/move/resize/flip/compose; None: the model's, else 20
    fill_dilation: int | None = None  # of zoom_out/pan; None: the model's, else 30

    def __post_init__(self) -> None:
        if not isinstance(self.num_steps, int) or self.num_steps < 2:
            raise ValueError(f"num_steps={self.num_steps!r} must be an integer >= 2")
        if not isinstance(self.inversion_iterations, int) or self.inversion_iterations < 0:
            raise ValueError(f"inversion_iterations={self.inversion_iterations!r} must be a non-negative integer")
        if self.guidance_scale is not None:
            check_real("guidance_scale", self.guidance_scale, 1.0)
        if self.mode not in ("hard", "soft"):
            raise ValueError(f"mode={self.mode!r} must be 'hard' or 'soft'")
        if self.dilation_units not in DILATION_UNITS:
            raise ValueError(f"dilation_units={self.dilation_units!r} must be one of {DILATION_UNITS}")
        for name in ("mask_from", "mask_until", "refine_until", "blend_until", "fuse_at", "proximal_strength",
                     "proximal_quantile") + (("hole_noise",) if self.hole_noise is not None else ()):
            check_real(name, getattr(self, name), 0.0, 1.0)
        check_real("threshold", self.threshold, 0.0, 1.0, high_open=True)
        check_real("proximal_below", self.proximal_below, 0.0)
        check_real("embedded_guidance", self.embedded_guidance, 0.0)
        check_int("seed", self.seed)
        if self.resolution is not None and (not is_int(self.resolution) or self.resolution < 8):
            raise ValueError(f"resolution={self.resolution!r} must be None or an integer >= 8 pixels")
        if not isinstance(self.prompt, str):
            raise ValueError(f"prompt={self.prompt!r} must be a string (\"\" for the paper's empty prompt)")  # noqa: TRY004
        for name in ("dilation", "fill_dilation"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0):
                raise ValueError(f"{name}={value!r} must be None or a non-negative integer number of pixels")

    def step(self, fraction: float) -> int:
        return round(fraction * self.num_steps)

    def start(self, fraction: float) -> int:
        """First step of a window starting at ``fraction`` (rounded up: 0.02 of 50 is step 1, of 10 also 1)."""
        return math.ceil(fraction * self.num_steps - 1e-9)

    def for_family(self, family: str, guidance_embeds: bool = False) -> DesignEditConfig:
        """This config with the family's defaults filled in; ValueError for options the model would ignore."""
        from attnedit.families import get_family

        hooks = get_family(family).image_pipeline
        distilled = hooks is not None and hooks.distilled  # one conditional pass per step, no CFG pair
        cfg, noise = DISTILLED_DEFAULTS if distilled else DEFAULTS
        config = dataclasses.replace(self, guidance_scale=cfg if self.guidance_scale is None else self.guidance_scale,
                                     hole_noise=noise if self.hole_noise is None else self.hole_noise)
        if distilled and config.guidance_scale != 1.0:
            raise ValueError(
                f"guidance_scale={config.guidance_scale}: FLUX.1 is guidance-distilled and runs one pass, with no "
                "unconditional branch to amplify the key mask against; leave guidance_scale at 1 (or None) and set "
                "embedded_guidance for its distilled guidance"
            )
        if distilled and config.mode == "soft":
            raise ValueError("mode='soft' needs the CFG pair to amplify the (1 - M) K key scaling; FLUX.1 runs one "
                             "pass, so use mode='hard' (hidden keys get zero weight)")
        if config.embedded_guidance != 1.0 and not guidance_embeds:
            raise ValueError(f"embedded_guidance={config.embedded_guidance} is only read by guidance-distilled models "
                             f"(FLUX.1-dev); this {family} model has no guidance embedding")
        return config


def with_model_defaults(config: DesignEditConfig, pipe: Any) -> DesignEditConfig:
    """``config`` with its unset (None) fields taken from the model's own edit settings, then the paper's mask
    growth (20 px; 30 for zoom-out and pan). The model's settings are those it carries (``pipe.attnedit_defaults``,
    set by :func:`~attnedit.shapes.builtin.load_builtin`), so the Python API, the CLI and the app edit alike."""
    from attnedit.shapes.builtin import edit_options

    fields = {f.name for f in dataclasses.fields(config)}
    unset = {k: v for k, v in edit_options(pipe).items() if k in fields and getattr(config, k) is None}
    config = dataclasses.replace(config, **unset)
    return dataclasses.replace(config, dilation=20 if config.dilation is None else config.dilation,
                               fill_dilation=30 if config.fill_dilation is None else config.fill_dilation)


class DesignEditor:
    """DesignEdit operations on a loaded SD 1.x/2.x, SDXL, SD3/SD3.5 or FLUX.1 pipeline.

    The pipe is not modified: a sampler is built from its scheduler config and the denoising loop is run here.
    Every operation takes an image (path, PIL, uint8 array) and returns a PIL image of the same size; the same
    inputs give the same output (deterministic sampling, VAE posterior mean, seeded hole noise).
    """

    def __init__(self, pipe: Any, config: DesignEditConfig | None = None) -> None:
        if config is not None and not isinstance(config, DesignEditConfig):
            raise ValueError(f"config={config!r} must be a DesignEditConfig")
        base = with_model_defaults(config or DesignEditConfig(), pipe)
        self.model: EditModel = edit_model(pipe, base.num_steps, base.prompt, base.embedded_guidance)
        embeds = bool(getattr(self.model.denoiser.config, "guidance_embeds", False))
        self.pipe, self.config = pipe, base.for_family(self.model.family, embeds)
        self.multiple, self.native = self.model.multiple, self.model.native
        self.long_side = self.config.resolution or self.native

    @property
    def device(self) -> torch.device:
        return self.model.device

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.model.decode(z)

    def invert(self, z0: torch.Tensor, run: Run) -> list[torch.Tensor]:
        """Inversion of latent ``z0``: ``latents[i]`` enters sampling step i (``latents[0]`` = x_T)."""
        return self.model.invert(run, z0, self.config.inversion_iterations)

    def dilate(self, mask: torch.Tensor, px: int) -> torch.Tensor:
        """Grow a bool source-resolution ``(H, W)`` mask by ``px`` in the config's ``dilation_units``."""
        if self.config.dilation_units == "radius":
            return dilate_mask(mask, px)
        if not isinstance(px, (int, np.integer)) or px < 0:
            raise ValueError(f"dilation={px!r} must be a non-negative integer number of pixels")
        return dilate_kernel(mask, round(px * max(mask.shape) / self.native))

    @torch.no_grad()
    def _denoise(self, latents: list[torch.Tensor], run: Run, hole: torch.Tensor | None,
                 layers: list[Layer], refine: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The DesignEdit loop (:func:`~attnedit.pipelines.design_fusion.denoise`) on this editor's model."""
        return denoise(self.model, self.config, latents, run, hole, layers, refine)

    # -- helpers turning user inputs into layers -------------------------------------------------------------------
    def _canvas(self, x: torch.Tensor) -> Canvas:
        return Canvas.fit(tuple(x.shape[-2:]), self.long_side, self.multiple)

    def _trajectory(self, x: torch.Tensor, canvas: Canvas) -> list[torch.Tensor]:
        return self.invert(self.encode(canvas.image(x)), self.model.run(canvas.padded))

    def _latent_mask(self, canvas: Canvas, mask: torch.Tensor) -> torch.Tensor:
        """Bool pixel mask (H, W) -> latent coverage (h, w) in [0, 1]."""
        f = self.pipe.vae_scale_factor
        return F.avg_pool2d(canvas.mask(mask)[None, None], f)[0, 0].to(self.device)

    def _mask(self, mask: MaskLike | list, size: tuple[int, int], name: str = "mask") -> torch.Tensor:
        """Union of one or several masks (a list of masks; a list of 4 ints is a box), checked non-empty/non-full."""
        many = isinstance(mask, list) and not all(isinstance(v, (int, np.integer)) for v in mask)
        masks = [load_mask(m, size, self.config.threshold) for m in (mask if many else [mask])]
        if not masks:
            raise ValueError(f"{name}=[] gives no mask")
        return check_mask(torch.stack(masks).any(dim=0), name)

    def _layer(self, latents: list[torch.Tensor], canvas: Canvas, mask: torch.Tensor, px: int, dx: int = 0, dy: int = 0) -> Layer:
        """Object layer from its trajectory and pixel mask, dilated by ``px``, moved by (dx, dy) source pixels."""
        check_move(mask, dx, dy)
        scale = canvas.inner[0] / canvas.size[0] / self.pipe.vae_scale_factor
        object_mask = (self._latent_mask(canvas, self.dilate(mask, px)) > 0.5).to(latents[0].dtype)[None, None]
        return Layer(latents, object_mask, (round(dy * scale), round(dx * scale)))

    @torch.no_grad()
    def _edit(self, x: torch.Tensor, hole: torch.Tensor | None, dilation: int, layers: list[Layer] = (),
              latents: list[torch.Tensor] | None = None, refine: torch.Tensor | None = None) -> Image.Image:
        canvas = self._canvas(x)
        latents = latents if latents is not None else self._trajectory(x, canvas)
        hole = None if hole is None else self._latent_mask(canvas, self.dilate(hole, dilation))
        refine = None if refine is None else self._latent_mask(canvas, refine)
        z, region = self._denoise(latents, self.model.run(canvas.padded), hole, list(layers), refine)
        out = canvas.restore(self.decode(z))
        if self.config.paste_back and region is not None:  # source pixels outside the (feathered) edited region
            f = self.pipe.vae_scale_factor
            keep = F.max_pool2d(F.interpolate(region, scale_factor=f, mode="nearest"), 2 * f + 1, stride=1, padding=f)
            keep = canvas.restore(F.avg_pool2d(keep, 2 * f + 1, stride=1, padding=f, count_include_pad=False)).clamp(0, 1)
            out = keep * out + (1 - keep) * x
        return to_pil(out)

    # -- operations -------------------------------------------------------------------------------------------
    def reconstruct(self, image: Any) -> Image.Image:
        """Plain DDIM inversion + reconstruction (the quality ceiling of every edit)."""
        return self._edit(load_image(image), None, 0)

    def remove(self, image: Any, mask: MaskLike | list, dilation: int | None = None, refine: MaskLike | list | None = None) -> Image.Image:
        """Remove the object(s) under ``mask`` (one mask, a box, or a list of them); ``dilation`` in px.

        ``refine`` marks regions the hole must not copy from (e.g. a duplicate of the object): their keys are
        hidden too, for the first ``refine_until`` of the steps, but their pixels are kept.
        """
        dilation = self.config.dilation if dilation is None else dilation
        check_pixels(dilation=dilation)
        x = load_image(image)
        size = tuple(x.shape[-2:])
        refine = None if refine is None else self._mask(refine, size, "refine")
        return self._edit(x, self._mask(mask, size), dilation, refine=refine)

    def move(self, image: Any, mask: MaskLike, dx: int, dy: int, dilation: int | None = None, object_dilation: int = 10) -> Image.Image:
        """Move the masked object by (dx, dy) px (+x right, +y down); it must stay inside the canvas."""
        dilation = self.config.dilation if dilation is None else dilation
        check_pixels(dx=dx, dy=dy, dilation=dilation, object_dilation=object_dilation)
        x = load_image(image)
        canvas, hole = self._canvas(x), self._mask(mask, tuple(x.shape[-2:]))
        check_move(hole, dx, dy)
        latents = self._trajectory(x, canvas)
        layer = self._layer(latents, canvas, hole, object_dilation, int(dx), int(dy))
        return self._edit(x, hole, dilation, [layer], latents)

    def resize(self, image: Any, mask: MaskLike, scale: float, dilation: int | None = None, object_dilation: int = 10) -> Image.Image:
        """Rescale the masked object by ``scale`` (> 0) about its box centre (resampled in pixel space)."""
        dilation = self.config.dilation if dilation is None else dilation
        check_real("scale", scale, 0.0, low_open=True)
        return self._transformed(image, mask, dilation, object_dilation, scale=float(scale))

    def flip(self, image: Any, mask: MaskLike, direction: str = "h", dilation: int | None = None, object_dilation: int = 10) -> Image.Image:
        """Mirror the masked object in place: ``direction`` "h" (left-right) or "v" (up-down)."""
        dilation = self.config.dilation if dilation is None else dilation
        if direction not in ("h", "v"):
            raise ValueError(f"direction={direction!r} must be 'h' (horizontal) or 'v' (vertical)")
        return self._transformed(image, mask, dilation, object_dilation, flip=direction)

    def _transformed(self, image: Any, mask: MaskLike, dilation: int, object_dilation: int, **transform: Any) -> Image.Image:
        check_pixels(dilation=dilation, object_dilation=object_dilation)
        x = load_image(image)
        hole = self._mask(mask, tuple(x.shape[-2:]))
        composite, moved = paste_object(x, hole, **transform)
        canvas = self._canvas(x)
        layer = self._layer(self._trajectory(composite, canvas), canvas, moved, object_dilation)
        return self._edit(x, hole, dilation, [layer])

    def zoom_out(self, image: Any, scale: float = 0.5, dilation: int | None = None) -> Image.Image:
        """Shrink the image by ``scale`` in (0, 1), paste it at the centre, and outpaint the border."""
        dilation = self.config.fill_dilation if dilation is None else dilation
        check_real("scale", scale, 0.0, 1.0, low_open=True, high_open=True)
        check_pixels(dilation=dilation)
        x = load_image(image)
        h, w = x.shape[-2:]
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        top, left = (h - size[0]) // 2, (w - size[1]) // 2
        composite, hole = x.clone(), torch.ones(h, w, dtype=torch.bool)
        composite[:, top: top + size[0], left: left + size[1]] = F.interpolate(x[None], size=size, mode="bilinear", antialias=True)[0]
        hole[top: top + size[0], left: left + size[1]] = False
        return self._edit(composite, check_mask(hole, "zoom_out border"), dilation)

    def pan(self, image: Any, direction: str, amount: int, dilation: int | None = None) -> Image.Image:
        """Pan the camera ``direction`` ("left"/"right"/"up"/"down") by ``amount`` px; the revealed strip is filled."""
        dilation = self.config.fill_dilation if dilation is None else dilation
        if direction not in PAN_DIRECTIONS:
            raise ValueError(f"direction={direction!r} must be one of {PAN_DIRECTIONS}")
        check_pixels(dilation=dilation)
        x = load_image(image)
        h, w = x.shape[-2:]
        extent = w if direction in ("left", "right") else h
        if not isinstance(amount, (int, np.integer)) or not 0 < amount < extent:
            raise ValueError(f"amount={amount!r} must be an integer in 1..{extent - 1} px for a {direction} pan of a {w}x{h} image")
        far = direction in ("right", "down")  # the revealed strip is at the far end of the axis
        axis = -1 if direction in ("left", "right") else -2
        pad = [0, 0, 0, 0]
        pad[(0 if axis == -1 else 2) + int(far)] = amount
        padded = F.pad(x[None], tuple(pad), mode="replicate")[0]
        composite = padded.narrow(axis, amount if far else 0, extent)
        hole = torch.zeros(h, w, dtype=torch.bool)
        hole.narrow(axis, extent - amount if far else 0, amount).fill_(True)
        return self._edit(composite, hole, dilation)

    def compose(self, background: Any, layers: list[ObjectLayer | tuple], remove: MaskLike | list | None = None,
                dilation: int | None = None, object_dilation: int = 10) -> Image.Image:
        """Paste objects from other images onto ``background`` (each an :class:`ObjectLayer` or a tuple of its
        fields), after optionally removing ``remove`` from it. Layer images of another size are fitted in
        (aspect kept, centred, edges replicated); masks are given at each layer image's own size."""
        dilation = self.config.dilation if dilation is None else dilation
        check_pixels(dilation=dilation, object_dilation=object_dilation)
        specs = object_layers(layers)
        x = load_image(background)
        size = tuple(x.shape[-2:])
        hole = None if remove is None else self._mask(remove, size, "remove")
        canvas, fitted = self._canvas(x), []
        for k, spec in enumerate(specs):  # every layer is checked before any model runs
            image = load_image(spec.image)
            image, mask = fit_to(image, self._mask(spec.mask, tuple(image.shape[-2:]), f"layers[{k}].mask"), size)
            check_move(mask, spec.dx, spec.dy)
            fitted.append((image, mask, spec))
        objects = [self._layer(self._trajectory(image, canvas), canvas, mask, object_dilation, spec.dx, spec.dy)
                   for image, mask, spec in fitted]
        return self._edit(x, hole, dilation, objects)


