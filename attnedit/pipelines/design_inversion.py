"""The model half of DesignEdit: conditioning, VAE, one denoiser call, one sampler step and its inversion.

DesignEdit's loop (``design_edit``) is the same for every model: invert the image keeping every latent, sample
again with a key mask, blend and fuse. What differs is here, behind one interface:

* :class:`DDIMModel` (SD 1.x / SDXL UNets): DDIM with eta 0 on epsilon predictions, as in the paper.
* :class:`FlowModel` (SD3 / SD3.5 MM-DiT, FLUX.1): rectified flow, Euler steps ``z <- z + (s' - s) v`` of
  the velocity ODE on the pipeline's FlowMatchEuler sigmas (FLUX: its resolution-dependent shift). FLUX latents
  stay unpacked ``(1, 16, h, w)`` here, so masks, blending and fusion are shared; they are packed 2x2 for the call.

Inversion runs each step backwards, ``z_i = unstep(z_{i+1}, f(z, t_i))``; with ``iterations`` > 0 the
prediction is taken at the result itself (a fixed point), so that sampling step i maps z_i back to z_{i+1}
exactly: the inversion of every later edit reconstructs (measured in ``benchmarks/inversion.py``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from attnedit.core.checks import check_int
from attnedit.families import detect_family


@dataclass
class Run:
    """One canvas size: the prompt conditioning and the model timesteps of each sampling step."""

    cond: Any
    timesteps: torch.Tensor  # (n,) model timesteps (0..1000), sampling order
    sigmas: torch.Tensor | None = None  # (n + 1,) flow models: noise level before each step, then 0


class EditModel:
    """What DesignEdit needs of a pipeline; subclasses implement one model family."""

    kinds: frozenset[str] = frozenset({"self"})  # attention the key mask acts on

    def __init__(self, pipe: Any, num_steps: int, prompt: str = "") -> None:
        self.pipe, self.num_steps, self.prompt = pipe, num_steps, prompt
        self.denoiser = pipe.unet if getattr(pipe, "unet", None) is not None else pipe.transformer
        self.declaration = detect_family(self.denoiser)
        self.family = self.declaration.name
        self._runs: dict[tuple[int, int], Run] = {}

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    def run(self, padded: tuple[int, int]) -> Run:
        """Conditioning and schedule for a canvas of ``padded`` (H, W) pixels (cached)."""
        if padded not in self._runs:
            with torch.no_grad():
                self._runs[padded] = self._make_run(padded)
        return self._runs[padded]

    @torch.no_grad()
    def invert(self, run: Run, z0: torch.Tensor, iterations: int = 0) -> list[torch.Tensor]:
        """``latents[i]`` enters sampling step i (``latents[0]`` = x_T, ``latents[-1]`` = z0)."""
        latents = [z0]
        for i in reversed(range(len(run.timesteps))):
            z = latents[-1]
            for _ in range(1 + iterations):  # fixed point: the prediction taken at the result itself
                z = self.unstep(run, latents[-1], self.predict(run, z, i), i)
            latents.append(z)
        return latents[::-1]

    # -- VAE -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(1, 3, H, W) in [-1, 1] -> model latent (posterior mean: deterministic), float32."""
        with self._vae() as vae:
            z = vae.encode(x.to(self.device, vae.dtype)).latent_dist.mean.float()
            return (z - (vae.config.get("shift_factor") or 0.0)) * vae.config.scaling_factor

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Model latent -> image (1, 3, H, W) in [-1, 1], float32."""
        with self._vae() as vae:
            z = z / vae.config.scaling_factor + (vae.config.get("shift_factor") or 0.0)
            return vae.decode(z.to(vae.dtype)).sample.float()

    @contextmanager
    def _vae(self) -> Iterator[torch.nn.Module]:
        """The VAE, upcast to float32 for the call when its config asks for it (SDXL's fp16 VAE overflows)."""
        vae = self.pipe.vae
        upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
        if upcast:
            vae.to(torch.float32)
        try:
            yield vae
        finally:
            if upcast:
                vae.to(torch.float16)

    # -- per family ------------------------------------------------------------------------------------------
    @property
    def multiple(self) -> int:
        """Canvas sides are padded to this many pixels."""
        raise NotImplementedError

    @property
    def native(self) -> int:
        """The model's native long side in pixels (SD 1.5 512, SDXL / SD3 / FLUX 1024)."""
        raise NotImplementedError

    def _make_run(self, padded: tuple[int, int]) -> Run:
        raise NotImplementedError

    def predict(self, run: Run, z: torch.Tensor, i: int) -> torch.Tensor:
        """Model output (epsilon or velocity) for latents ``z`` (rows, C, h, w) at sampling step i."""
        raise NotImplementedError

    def step(self, run: Run, z: torch.Tensor, out: torch.Tensor, i: int) -> torch.Tensor:
        """Sampling step i: the latent entering step i + 1."""
        raise NotImplementedError

    def unstep(self, run: Run, z: torch.Tensor, out: torch.Tensor, i: int) -> torch.Tensor:
        """The inverse of :meth:`step` for a given model output: the latent entering step i."""
        raise NotImplementedError


def ddim_move(z: torch.Tensor, eps: torch.Tensor, alpha_from: torch.Tensor, alpha_to: torch.Tensor) -> torch.Tensor:
    """Deterministic DDIM move of latent ``z`` from noise level ``alpha_from`` to ``alpha_to`` (either direction)."""
    x0 = (z - (1 - alpha_from).sqrt() * eps) / alpha_from.sqrt()
    return alpha_to.sqrt() * x0 + (1 - alpha_to).sqrt() * eps


class DDIMModel(EditModel):
    """SD 1.x / 2.x and SDXL UNets, sampled with DDIM (eta 0) built from the pipeline's scheduler config."""

    def __init__(self, pipe: Any, num_steps: int, prompt: str = "") -> None:
        from diffusers import DDIMScheduler

        super().__init__(pipe, num_steps, prompt)
        self.xl = getattr(pipe, "text_encoder_2", None) is not None
        self.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        self.scheduler.set_timesteps(num_steps)

    @property
    def multiple(self) -> int:
        return self.pipe.vae_scale_factor * 2 ** (len(self.denoiser.config.block_out_channels) - 1)

    @property
    def native(self) -> int:
        sample = self.denoiser.config.sample_size
        return (sample if isinstance(sample, int) else max(sample)) * self.pipe.vae_scale_factor

    def _make_run(self, padded: tuple[int, int]) -> Run:
        pipe = self.pipe
        if not self.xl:
            return Run((pipe.encode_prompt(self.prompt, self.device, 1, False)[0], None), self.scheduler.timesteps)
        emb, _, pooled, _ = pipe.encode_prompt(prompt=self.prompt, device=self.device, do_classifier_free_guidance=False)
        ids = pipe._get_add_time_ids(padded, (0, 0), padded, emb.dtype, pipe.text_encoder_2.config.projection_dim)
        return Run((emb, {"text_embeds": pooled, "time_ids": ids.to(self.device)}), self.scheduler.timesteps)

    def _alphas(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.scheduler
        prev = int(t) - s.config.num_train_timesteps // s.num_inference_steps
        return s.alphas_cumprod[int(t)], s.alphas_cumprod[prev] if prev >= 0 else s.final_alpha_cumprod

    def predict(self, run: Run, z: torch.Tensor, i: int) -> torch.Tensor:
        (emb, added), rows, unet = run.cond, z.shape[0], self.denoiser
        added = None if added is None else {k: v.expand(rows, *v.shape[1:]) for k, v in added.items()}
        eps = unet(z.to(unet.dtype), run.timesteps[i], encoder_hidden_states=emb.expand(rows, -1, -1),
                   added_cond_kwargs=added).sample
        return eps.to(z.dtype)  # the sampler arithmetic stays in float32 whatever the model's dtype

    def step(self, run: Run, z: torch.Tensor, out: torch.Tensor, i: int) -> torch.Tensor:
        return ddim_move(z, out, *self._alphas(run.timesteps[i]))

    def unstep(self, run: Run, z: torch.Tensor, out: torch.Tensor, i: int) -> torch.Tensor:
        a_t, a_prev = self._alphas(run.timesteps[i])
        return ddim_move(z, out, a_prev, a_t)


class FlowModel(EditModel):
    """Rectified-flow transformers (SD3 / SD3.5, FLUX.1): Euler steps of the velocity ODE on the pipeline's sigmas.

    The family's image-pipeline hooks (``flow_run`` / ``flow_predict``) set the schedule, encode the prompt and
    make the call (FLUX.1: packing its 2x2 latents there, so latents stay unpacked here).
    """

    kinds = frozenset({"joint", "self"})  # joint image keys; SD3.5's image self-attention (attn2) too

    def __init__(self, pipe: Any, num_steps: int, prompt: str = "", embedded_guidance: float = 1.0) -> None:
        from attnedit.shapes.builtin import call_options

        super().__init__(pipe, num_steps, prompt)
        self.embedded_guidance = embedded_guidance
        self.hooks = self.declaration.image_pipeline
        # T5 tokens: the pipelines' defaults, or what a built-in model was trained with (shapes-dit: 24)
        self.text_length = call_options(pipe).get("max_sequence_length", self.hooks.text_length)

    @property
    def multiple(self) -> int:
        return self.hooks.size(self.pipe)[0]

    @property
    def native(self) -> int:
        return self.hooks.size(self.pipe)[1]

    def _make_run(self, padded: tuple[int, int]) -> Run:
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.pipe.scheduler.config)
        h, w = (s // self.pipe.vae_scale_factor for s in padded)
        cond = self.hooks.flow_run(self, scheduler, h, w)
        return Run(cond, scheduler.timesteps.float(), scheduler.sigmas.float())

    def predict(self, run: Run, z: torch.Tensor, i: int) -> torch.Tensor:
        t = run.timesteps[i].to(self.device).expand(z.shape[0])
        return self.hooks.flow_predict(self, run.cond, z, t)

    def step(self, run: Run, z: torch.Tensor, out: torch.Tensor, i: int) -> torch.Tensor:
        return z + (run.sigmas[i + 1] - run.sigmas[i]) * out

    def unstep(self, run: Run, z: torch.Tensor, out: torch.Tensor, i: int) -> torch.Tensor:
        return z - (run.sigmas[i + 1] - run.sigmas[i]) * out


def edit_model(pipe: Any, num_steps: int, prompt: str = "", embedded_guidance: float = 1.0) -> EditModel:
    """The :class:`EditModel` for a loaded pipeline; ValueError for a family DesignEdit does not support."""
    check_int("num_steps", num_steps, 1)
    if not isinstance(prompt, str):
        raise ValueError(f"prompt={prompt!r} must be a string")  # noqa: TRY004
    denoiser = getattr(pipe, "unet", None)
    denoiser = getattr(pipe, "transformer", None) if denoiser is None else denoiser
    if denoiser is None or getattr(pipe, "vae", None) is None:
        raise ValueError(f"DesignEditor needs a pipeline with a unet or transformer and a vae, got {type(pipe).__name__}")
    family = detect_family(denoiser)
    hooks = family.image_pipeline
    if hooks is None or (hooks.sampler == "flow" and hooks.flow_run is None):
        raise ValueError(
            f"DesignEditor supports Stable Diffusion 1.x/2.x/XL (unet), SD3/SD3.5 (sd3) and FLUX.1 (flux) pipelines; "
            f"{type(pipe).__name__} is a {family.name} pipeline"
        )
    if hooks.sampler == "ddim":
        return DDIMModel(pipe, num_steps, prompt)
    return FlowModel(pipe, num_steps, prompt, embedded_guidance)
