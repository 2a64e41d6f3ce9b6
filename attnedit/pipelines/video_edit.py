"""Training-free video object removal on Wan 2.x and HunyuanVideo: DesignEdit's key masking, in space and time.

The image editor's recipe (Jia et al., "DesignEdit", arXiv:2403.14487; KV-Edit, Zhu et al. 2025, for models run
without CFG) carried to video transformers:

1. *Inversion.* The clip is encoded (VAE posterior mean) and inverted along the rectified-flow ODE, keeping every
   latent x*_t (:class:`~attnedit.pipelines.video_model.VideoModel`; ``inversion_iterations`` > 0 refines each
   step to a fixed point).
2. *Key masking.* From x*_T, with the hole re-initialised with fresh noise (``hole_noise``), every self-attention
   (Wan) or joint attention (HunyuanVideo) call hides the keys of the hole from every query, in every frame: the
   per-frame masks are grown by ``dilation`` pixels, mapped to latent frames (the VAE packs ``temporal`` pixel
   frames into one) and grown by ``temporal_dilation`` latent frames either way
   (:mod:`attnedit.methods.video_key_masking`), so the object is copied in from no neighbouring frame. Hidden keys
   get exactly zero weight.
3. *Latent blending.* Outside the hole the latent follows its inverted trajectory, z <- M z + (1 - M) x*_t (the
   background keys and values are those of the inversion, as KV-Edit's cache), until ``blend_until``.
4. *Paste-back.* Outside the edited region (grown and feathered by one latent cell) the source pixels are kept.

Clips of any length and aspect are padded (edge frames and pixels replicated) to what the VAE and patching accept
and cropped back; the output has the source's frame count, size and fps. Under radial attention
(``radial="wan"`` / ``"hunyuan_video"`` or a :class:`RadialAttention`) key blocks that the mask hides entirely are
dropped from the block-sparse call (:mod:`attnedit.core.key_blocks`), so a large mask costs less attention.

``move`` is not offered: the image editor moves an object by pasting its inverted latent layer at an integer
offset, and along a track that is one offset per latent frame while each latent frame blends ``temporal`` pixel
frames of the object's motion; it needs object layers per latent frame and a re-timing of the object, not a
parameter of removal.

>>> editor = VideoEditor(pipe)                                         # a loaded Wan / HunyuanVideo pipeline  # doctest: +SKIP
>>> clean = editor.remove("clip.mp4", "masks/")                        # Video: frames (F, H, W, 3), fps  # doctest: +SKIP
>>> clean.save("clean.mp4")                                            # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from attnedit.core.install import install
from attnedit.methods.radial import RadialAttention
from attnedit.methods.video_key_masking import VideoKeyMask, dilate_time, latent_frame_index, latent_hole
from attnedit.pipelines.design_inversion import Run
from attnedit.pipelines.video_io import load_masks, load_video, save_video
from attnedit.pipelines.video_model import VideoModel, video_model

__all__ = ["Video", "VideoEditConfig", "VideoEditor"]


@dataclass(frozen=True)
class VideoEditConfig:
    """Settings of a removal; step windows are fractions of ``num_steps``.

    ``dilation`` grows every frame's mask by that many pixels (None: 1/48 of the long side, at least 1);
    ``temporal_dilation`` grows the key mask by that many latent frames each way. ``guidance_scale`` > 1 runs the
    [uncond, cond] pair with an empty prompt, the key mask on cond only (the DesignEdit paper's amplification,
    Wan only: HunyuanVideo is guidance-distilled and runs one pass with ``embedded_guidance``). ``radial`` is a
    preset name, True (the family's preset) or a :class:`RadialAttention`; its dense steps are the same timesteps
    in inversion and sampling.
    """

    num_steps: int = 30
    guidance_scale: float = 1.0
    mode: str = "hard"
    mask_until: float = 0.8
    blend_until: float = 0.9
    hole_noise: float = 1.0
    dilation: int | None = None
    temporal_dilation: int = 1
    threshold: float = 0.5
    paste_back: bool = True
    inversion_iterations: int = 0
    embedded_guidance: float = 1.0
    prompt: str = ""
    text_length: int | None = None
    prompt_template: dict | None = field(default=None, hash=False)
    radial: Any = None
    key_mask: bool = True  # False: the same run with no key hidden (the ablation of the benchmark)
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.num_steps, int) or self.num_steps < 2:
            raise ValueError(f"num_steps={self.num_steps!r} must be an integer >= 2")
        if not isinstance(self.inversion_iterations, int) or self.inversion_iterations < 0:
            raise ValueError(f"inversion_iterations={self.inversion_iterations!r} must be a non-negative integer")
        if self.guidance_scale < 1.0:
            raise ValueError(f"guidance_scale={self.guidance_scale} must be >= 1")
        if self.mode not in ("hard", "soft"):
            raise ValueError(f"mode={self.mode!r} must be 'hard' or 'soft'")
        for name in ("mask_until", "blend_until", "hole_noise"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}={getattr(self, name)} must be in [0, 1]")
        if self.dilation is not None and (not isinstance(self.dilation, int) or self.dilation < 0):
            raise ValueError(f"dilation={self.dilation!r} must be None or a non-negative integer number of pixels")
        if not isinstance(self.temporal_dilation, int) or self.temporal_dilation < 0:
            raise ValueError(f"temporal_dilation={self.temporal_dilation!r} must be a non-negative integer (latent frames)")
        if self.radial is not None and not isinstance(self.radial, (bool, str, RadialAttention)):
            raise ValueError(f"radial={self.radial!r} must be None, True, a preset name or a RadialAttention")

    def step(self, fraction: float) -> int:
        return round(fraction * self.num_steps)


@dataclass
class Video:
    """An edited clip: ``frames`` ``(F, H, W, 3)`` uint8 at ``fps``, and where the time went (seconds)."""

    frames: np.ndarray
    fps: float
    timings: dict[str, float] = field(default_factory=dict)

    def save(self, path: Any) -> Any:
        """Write an MP4 / GIF / folder of PNGs (see :func:`~attnedit.pipelines.video_io.save_video`)."""
        return save_video(self.frames, path, self.fps)


def _pad(x: torch.Tensor, frames: int, height: int, width: int) -> torch.Tensor:
    """(C, F, H, W) -> (C, frames, height, width), the last frame and the right/bottom edges replicated."""
    c, f, h, w = x.shape
    x = torch.cat([x, x[:, -1:].expand(c, frames - f, h, w)], dim=1) if frames > f else x
    return F.pad(x[None].float(), (0, width - w, 0, height - h, 0, 0), mode="replicate")[0] if (height, width) != (h, w) else x


class VideoEditor:
    """Object removal on a loaded Wan 2.x or HunyuanVideo pipeline (the pipe is not modified)."""

    def __init__(self, pipe: Any, config: VideoEditConfig | None = None) -> None:
        self.config = config or VideoEditConfig()
        c = self.config
        self.model: VideoModel = video_model(pipe, c.num_steps, prompt=c.prompt, embedded_guidance=c.embedded_guidance,
                                             text_length=c.text_length, prompt_template=c.prompt_template)
        self.pipe = pipe
        if self.model.hooks.distilled and c.guidance_scale != 1.0:
            raise ValueError(f"guidance_scale={c.guidance_scale}: {type(pipe).__name__} is guidance-distilled and runs one pass; "
                             "leave guidance_scale at 1 and set embedded_guidance")
        if c.embedded_guidance != 1.0 and not self.model.hooks.distilled:
            raise ValueError(f"embedded_guidance={c.embedded_guidance} is only read by guidance-distilled models "
                             f"(HunyuanVideo); {type(pipe).__name__} runs CFG")
        self.radial = self._radial(c.radial)

    def _radial(self, radial: Any) -> RadialAttention | None:
        if radial is None or radial is False:
            return None
        edit = RadialAttention.preset(self.model.family if radial is True else radial) if not isinstance(radial, RadialAttention) else radial
        if edit.steps is not None:
            raise ValueError(f"radial={edit!r} has a step window; give dense_steps / dense_tail_steps instead")
        if edit.num_steps not in (None, self.config.num_steps):
            raise ValueError(f"radial num_steps={edit.num_steps} differs from the editor's num_steps={self.config.num_steps}")
        return dataclasses.replace(edit, num_steps=self.config.num_steps)

    # -- pieces ---------------------------------------------------------------------------------------------
    def _prepare(self, frames: np.ndarray) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """uint8 (F, H, W, 3) -> padded (1, 3, F', H', W') in [-1, 1] and the padded (F', H', W')."""
        f, h, w = frames.shape[:3]
        m = self.model.multiple
        size = (self.model.frames_for(f), -(-h // m) * m, -(-w // m) * m)
        x = torch.from_numpy(frames).permute(3, 0, 1, 2).float() / 127.5 - 1
        return _pad(x, *size)[None], size

    def _edits(self, hole_keys: torch.Tensor | None, inversion: bool) -> list:
        c, edits = self.config, []
        r = self.radial
        if r is not None and inversion:  # inversion step k is sampling step n - 1 - k: head and tail swap
            r = dataclasses.replace(r, dense_steps=r.dense_tail_steps, dense_tail_steps=r.dense_steps)
        if r is not None:
            edits.append(r)
        if hole_keys is not None and c.key_mask and c.step(c.mask_until) > 0:
            edits.append(VideoKeyMask(mask=hole_keys, mode=c.mode, kinds=self.model.kinds,
                                      steps=(0, c.step(c.mask_until)), branches=frozenset({"cond"})))
        return edits

    def _installed(self, edits: list):
        return install(self.pipe, *edits) if edits else nullcontext()

    @torch.no_grad()
    def _invert(self, z0: torch.Tensor, run: Run) -> list[torch.Tensor]:
        with self._installed(self._edits(None, inversion=True)) as handle, \
                handle.branches("cond") if handle else nullcontext():
            return self.model.invert(run, z0, self.config.inversion_iterations)

    @torch.no_grad()
    def _sample(self, latents: list[torch.Tensor], run: Run, region: torch.Tensor | None,
                hole_keys: torch.Tensor | None) -> torch.Tensor:
        """From x*_T: key-masked steps, blended to the trajectory outside ``region`` (1, 1, F_lat, h, w)."""
        c, model = self.config, self.model
        z = latents[0].clone()
        if region is not None and c.hole_noise > 0:
            fresh = torch.randn(z.shape, generator=torch.Generator().manual_seed(c.seed)).to(z)
            z = region * ((1 - c.hole_noise) ** 0.5 * z + c.hole_noise ** 0.5 * fresh) + (1 - region) * z
        cfg = c.guidance_scale > 1
        with self._installed(self._edits(hole_keys, inversion=False)) as handle, \
                handle.branches(*(("uncond", "cond") if cfg else ("cond",))) if handle else nullcontext():
            for i in range(len(run.timesteps)):
                if cfg:
                    out_u, out_c = model.predict(run, torch.cat([z, z]), i).chunk(2)
                    out = out_u + c.guidance_scale * (out_c - out_u)
                else:
                    out = model.predict(run, z, i)
                z = model.step(run, z, out, i)
                if region is not None and i < c.step(c.blend_until):
                    z = region * z + (1 - region) * latents[i + 1]
        return z

    def _holes(self, masks: torch.Tensor, padded: tuple[int, int, int], grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(blend region (1, 1, F_lat, h, w) float, key mask (F_tok, h_tok, w_tok) float) from pixel masks (F, H, W)."""
        c, model = self.config, self.model
        m = _pad(masks[None].float(), *padded)[0] > 0.5
        dilation = c.dilation if c.dilation is not None else max(1, round(max(masks.shape[1:]) / 48))
        share = latent_hole(m, model.temporal, grid, dilation)
        region = (share > 0).float()
        keys = dilate_time(region, c.temporal_dilation)
        pt, ph, pw = model.patch
        keys = F.max_pool3d(keys[None, None], (pt, ph, pw), ceil_mode=True)[0, 0] if (pt, ph, pw) != (1, 1, 1) else keys
        return region[None, None].to(self.model.device), keys

    def _paste(self, out: torch.Tensor, source: torch.Tensor, region: torch.Tensor, frames: int) -> torch.Tensor:
        """Source pixels outside the edited region (grown and feathered by a latent cell); (3, F, H, W) in [-1, 1]."""
        s = self.model.spatial
        per_frame = region[0, 0, latent_frame_index(frames, self.model.temporal)].cpu()  # (F, h, w)
        keep = F.interpolate(per_frame[:, None], scale_factor=s, mode="nearest")
        keep = F.max_pool2d(keep, 2 * s + 1, stride=1, padding=s)
        keep = F.avg_pool2d(keep, 2 * s + 1, stride=1, padding=s, count_include_pad=False).clamp(0, 1)
        keep = keep[:, :, : out.shape[2], : out.shape[3]].permute(1, 0, 2, 3)
        return keep * out + (1 - keep) * source

    @torch.no_grad()
    def _run(self, video: Any, masks: Any | None) -> Video:
        frames, fps = load_video(video)
        f, h, w = frames.shape[:3]
        hole = None if masks is None else load_masks(masks, f, (h, w), self.config.threshold)
        timings, start = {}, time.perf_counter()
        x, padded = self._prepare(frames)
        run = self.model.run(padded)
        z0 = self.model.encode(x)
        timings["encode"] = time.perf_counter() - start
        latents = self._invert(z0, run)
        timings["invert"] = time.perf_counter() - start - sum(timings.values())
        region = keys = None
        if hole is not None:
            region, keys = self._holes(hole, padded, tuple(z0.shape[-2:]))
        z = self._sample(latents, run, region, keys)
        timings["sample"] = time.perf_counter() - start - sum(timings.values())
        out = self.model.decode(z)[0, :, :f, :h, :w].cpu()
        source = x[0, :, :f, :h, :w]
        if region is not None and self.config.paste_back:
            out = self._paste(out, source, region, f)
        timings["decode"] = time.perf_counter() - start - sum(timings.values())
        pixels = ((out.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()
        return Video(np.ascontiguousarray(pixels), fps, timings)

    # -- operations -------------------------------------------------------------------------------------------
    def reconstruct(self, video: Any) -> Video:
        """Inversion and plain reconstruction of the clip: the quality ceiling, and the time a removal adds to."""
        return self._run(video, None)

    def remove(self, video: Any, masks: Any) -> Video:
        """Remove what ``masks`` cover from ``video`` (see :mod:`~attnedit.pipelines.video_io` for both inputs).

        Returns the clip with the source's frame count, size and fps; the same inputs give the same frames.
        """
        return self._run(video, masks)
