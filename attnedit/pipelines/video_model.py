"""The model half of video editing: Wan 2.x and HunyuanVideo behind DesignEdit's :class:`EditModel` interface.

Both are rectified-flow transformers over video latents ``(1, C, F_lat, h, w)``: sampling takes Euler steps
``z <- z + (s' - s) v`` on the pipeline's flow-matching sigmas (Wan: the scheduler's shift, also when the pipeline
ships UniPC with ``flow_shift``; HunyuanVideo: ``linspace(1, 0)`` shifted, as its pipeline), and inversion runs
them backwards (:meth:`EditModel.invert`, with the fixed-point option). The VAE is read at its posterior mean
(deterministic) and normalized as each pipeline does (Wan: per-channel ``latents_mean`` / ``latents_std``;
HunyuanVideo: ``scaling_factor``). Wan 2.2's second denoiser takes the steps below its ``boundary_ratio``.
"""

from __future__ import annotations

from typing import Any

import torch

from attnedit.families import detect_family
from attnedit.pipelines.design_inversion import EditModel, Run


class VideoModel(EditModel):
    """A video family (Wan 2.x, HunyuanVideo): conditioning, VAE, one velocity call, Euler step and its inverse.

    What differs per family comes from its video-pipeline hooks (:class:`attnedit.core.family_hooks.VideoPipelineHooks`).
    """

    def __init__(self, pipe: Any, num_steps: int, prompt: str = "", embedded_guidance: float = 1.0,
                 text_length: int | None = None, prompt_template: dict | None = None) -> None:
        super().__init__(pipe, num_steps, prompt)
        self.hooks = self.declaration.video_pipeline
        self.kinds = self.hooks.kinds
        self.embedded_guidance = embedded_guidance
        template = self.hooks.prompt_template
        self.prompt_template = prompt_template if prompt_template is not None or template is None else template(pipe)
        from attnedit.shapes.builtin import call_options

        self.text_length = text_length or call_options(pipe).get("max_sequence_length", self.hooks.text_length)

    # -- geometry ---------------------------------------------------------------------------------------------
    @property
    def patch(self) -> tuple[int, int, int]:
        """(frames, height, width) latents per token."""
        return self.hooks.patch(self.denoiser.config)

    @property
    def temporal(self) -> int:
        return int(self.pipe.vae_scale_factor_temporal)

    @property
    def spatial(self) -> int:
        return int(self.pipe.vae_scale_factor_spatial)

    @property
    def multiple(self) -> int:
        return self.spatial * max(self.patch[1:])

    def frames_for(self, frames: int) -> int:
        """The fewest pixel frames >= ``frames`` the VAE and patching accept (``1 + temporal * k``, whole tokens)."""
        n = frames
        while (n - 1) % self.temporal or ((n - 1) // self.temporal + 1) % self.patch[0]:
            n += 1
        return n

    # -- VAE ------------------------------------------------------------------------------------------------
    def _norm(self, like: torch.Tensor) -> tuple[torch.Tensor | float, torch.Tensor | float]:
        """(shift, scale): model latent = (vae latent - shift) * scale."""
        return self.hooks.norm(self.pipe.vae.config, like)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(1, 3, F, H, W) in [-1, 1] -> model latent (1, C, F_lat, h, w), float32 (posterior mean)."""
        with self._vae() as vae:
            z = vae.encode(x.to(self.device, vae.dtype)).latent_dist.mean.float()
        shift, scale = self._norm(z)
        return (z - shift) * scale

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Model latent -> video (1, 3, F, H, W) in [-1, 1], float32."""
        shift, scale = self._norm(z)
        with self._vae() as vae:
            return vae.decode((z / scale + shift).to(vae.dtype), return_dict=False)[0].float()

    # -- schedule and calls ------------------------------------------------------------------------------
    def _make_run(self, padded: tuple[int, ...]) -> Run:
        from diffusers import FlowMatchEulerDiscreteScheduler

        config = dict(self.pipe.scheduler.config)
        shift = config.get("shift") if "shift" in config else config.get("flow_shift", 1.0)
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=config.get("num_train_timesteps", 1000),
                                                    shift=float(shift or 1.0))
        cond = self.hooks.run(self, scheduler)
        return Run(cond, scheduler.timesteps.float(), scheduler.sigmas.float())

    def _denoiser_at(self, t: float) -> torch.nn.Module:
        """Wan 2.2 A14B: ``transformer`` for t >= boundary_ratio * 1000, ``transformer_2`` below."""
        second = getattr(self.pipe, "transformer_2", None)
        ratio = getattr(self.pipe.config, "boundary_ratio", None)
        if second is None or ratio is None:
            return self.denoiser
        return self.denoiser if t >= ratio * self.pipe.scheduler.config.num_train_timesteps else second

    def predict(self, run: Run, z: torch.Tensor, i: int) -> torch.Tensor:
        """Velocity for latents ``z`` (rows, C, F_lat, h, w) at sampling step i."""
        rows, t = z.shape[0], run.timesteps[i]
        model = self._denoiser_at(float(t))
        ts = t.to(self.device).expand(rows)
        return self.hooks.predict(self, model, z, ts, run.cond)

    def step(self, run: Run, z: torch.Tensor, out: torch.Tensor, i: int) -> torch.Tensor:
        return z + (run.sigmas[i + 1] - run.sigmas[i]) * out

    def unstep(self, run: Run, z: torch.Tensor, out: torch.Tensor, i: int) -> torch.Tensor:
        return z - (run.sigmas[i + 1] - run.sigmas[i]) * out


def video_model(pipe: Any, num_steps: int, **options: Any) -> VideoModel:
    """The :class:`VideoModel` of a loaded Wan / HunyuanVideo pipeline; ValueError for any other pipeline."""
    denoiser = getattr(pipe, "transformer", None)
    if denoiser is None or getattr(pipe, "vae", None) is None:
        raise ValueError(f"VideoEditor needs a Wan or HunyuanVideo pipeline (transformer and vae); got {type(pipe).__name__}")
    try:
        family = detect_family(denoiser)
    except ValueError as error:
        raise ValueError(f"VideoEditor needs a Wan or HunyuanVideo pipeline: {error}") from None
    if family.video_pipeline is None:
        from attnedit.families import MODULES

        supported = ", ".join(m.FAMILY.name for m in MODULES if m.FAMILY.video_pipeline is not None)
        kind = "video" if family.video else "image"
        raise ValueError(f"VideoEditor supports video models ({supported}); {type(pipe).__name__} is a "
                         f"{family.name} ({kind}) pipeline" + ("" if family.video else ": use DesignEditor for images"))
    return VideoModel(pipe, num_steps, **options)
