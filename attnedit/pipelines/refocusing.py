"""Attention refocusing on stock diffusers pipelines (SD 1.x, SDXL, SD3): :func:`refocus`.

Phung, Ge and Huang (2024), "Grounded Text-to-Image Synthesis with Attention Refocusing" (arXiv:2306.05427); the
losses and the schedule live in :mod:`attnedit.refocusing`. The stock pipeline runs unchanged: the initial noise
is drawn exactly as the pipeline would draw it (same generator, same numbers), refocused for step 0 and passed as
``latents=``; for steps 1..N-1, ``callback_on_step_end`` refocuses the latent the pipeline will denoise next
(against ``timesteps[i + 1]``). Each refocusing iteration is one extra conditional-only forward with gradients
(``handle.branches("cond")``) whose attention maps are recorded at one resolution:

* SD 1.x: cross/self layers whose grid is latent / 4 (16x16 at 512 px, the paper's layers);
* SDXL: latent / 2 (64x64 at 1024 px: down_blocks.1 and up_blocks.1, the middle of its three resolutions);
* UNets without that grid, or where it is under 8x8 (tiny and built-in models), use their finest attention grid;
* SD3: every joint block (or ``config.layers``): image queries -> text keys (CAR), -> image keys (SAR).

Other edits (``edits=``) apply to the pipeline's forwards and to the refocusing forwards; pass ``handle=`` to run
inside an existing installation, e.g. ``with perturbed_guidance(pipe, ...) as h: refocus(pipe, layout, handle=h)``.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.utils.torch_utils import randn_tensor

from ..edits import Edit
from ..install import Installation, install
from ..refocusing import Layout, MapRecorder, RefocusConfig, TokenLayout, refocus_latents, token_layout

SUPPORTED = ("unet", "sd3")


@dataclass(frozen=True, kw_only=True)
class _GridProbe(Edit):
    """Notes the token grid of every call it covers; changes nothing (no probabilities needed)."""

    grids: dict = field(default_factory=dict, compare=False, repr=False)

    def key_keep(self, call: Any) -> None:
        self.grids[call.site] = tuple(call.grid[-2:])


def _conditioner(pipe: Any, family: str, prompt: str, size: tuple[int, int], max_sequence_length: int) -> Any:
    """forward(x, t): the conditional denoiser call of the pipeline, batch 1."""
    device = pipe._execution_device
    if family == "sd3":
        emb, _, pooled, _ = pipe.encode_prompt(prompt=prompt, prompt_2=None, prompt_3=None, device=device,
                                               do_classifier_free_guidance=False, max_sequence_length=max_sequence_length)
        return lambda x, t: pipe.transformer(hidden_states=x, timestep=t.expand(1), encoder_hidden_states=emb,
                                             pooled_projections=pooled, return_dict=False)
    scale = pipe.scheduler.scale_model_input
    if getattr(pipe, "text_encoder_2", None) is None:  # SD 1.x / 2.x
        emb = pipe.encode_prompt(prompt, device, 1, False)[0]
        return lambda x, t: pipe.unet(scale(x, t), t, encoder_hidden_states=emb, return_dict=False)
    emb, _, pooled, _ = pipe.encode_prompt(prompt=prompt, device=device, do_classifier_free_guidance=False)
    ids = pipe._get_add_time_ids(size, (0, 0), size, dtype=emb.dtype,
                                 text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim).to(device)
    extra = {"text_embeds": pooled, "time_ids": ids}
    return lambda x, t: pipe.unet(scale(x, t), t, encoder_hidden_states=emb, added_cond_kwargs=extra, return_dict=False)


def map_layers(handle: Installation, forward: Any, x: torch.Tensor, t: torch.Tensor,
               config: RefocusConfig) -> tuple[str, str, frozenset[int], frozenset[int]]:
    """(text kind, image kind, text layers, image layers) the losses record.

    UNets: the layers at the paper's grid (latent/4 for SD 1.x: 16x16 at 512 px, its 5 layers; latent/2 for
    SDXL), found by one probing forward ``forward(x, t)``; SD3: every joint block.
    """
    if handle.family.name == "sd3":
        layers = config.layers or frozenset(s.layer for s in handle.sites if s.kind == "joint")
        return "joint", "joint", layers, layers
    if config.layers is not None:
        return "cross", "self", config.layers, config.layers
    probe, base = _GridProbe(kinds=frozenset({"self", "cross"})), handle.edits
    handle.edits = (*base, probe)
    try:
        with torch.no_grad(), handle.branches("cond"):
            forward(x, t)
    finally:
        handle.edits = base
    latent = tuple(x.shape[-2:])
    sdxl = handle.models[0].config.get("addition_embed_type") == "text_time"  # SDXL's micro-conditioning
    factor = 2 if sdxl else 4  # SDXL: latent / 2; SD 1.x: latent / 4
    target = tuple(-(-n // factor) for n in latent)
    grids = {g for s, g in probe.grids.items() if s.kind == "cross"}
    # a grid under 8 tokens a side is too coarse to hold a box (the paper's maps are 16x16): then the finest grid
    chosen = target if target in grids and min(target) >= 8 else max(grids, key=lambda g: g[0] * g[1])
    pick = lambda kind: frozenset(s.layer for s, g in probe.grids.items() if s.kind == kind and g == chosen)
    return "cross", "self", pick("cross"), pick("self")


def _recorders(handle: Installation, pipe: Any, forward: Any, x: torch.Tensor, t: torch.Tensor,
               config: RefocusConfig) -> list[MapRecorder]:
    """Recorders of exactly the maps the selected losses read, conditional rows only."""
    text_kind, image_kind, text_layers, image_layers = map_layers(handle, forward, x, t, config)
    cond = frozenset({"cond"})
    recorders = []
    if "car" in config.losses:
        recorders.append(MapRecorder(kinds=frozenset({text_kind}), layers=text_layers, branches=cond, keys="text"))
    if "sar" in config.losses:
        recorders.append(MapRecorder(kinds=frozenset({image_kind}), layers=image_layers, branches=cond, keys="image"))
    return recorders


@dataclass
class _Refocuser:
    """Refocuses one latent at one step, with the recorders added to the installation only meanwhile."""

    handle: Installation
    forward: Any
    recorders: list[MapRecorder]
    layout: Layout
    config: RefocusConfig
    tokens: TokenLayout
    losses: dict[int, list[float]] = field(default_factory=dict)

    def __call__(self, latents: torch.Tensor, t: torch.Tensor, step: int) -> torch.Tensor:
        base, model = self.handle.edits, self.handle.models[0]
        checkpointing = self.config.gradient_checkpointing and not model.is_gradient_checkpointing
        self.handle.edits = (*base, *self.recorders)
        try:
            if checkpointing:
                model.enable_gradient_checkpointing()
            with self.handle.branches("cond"):
                x, history = refocus_latents(lambda z: self.forward(z, t), latents, step, self.recorders,
                                             self.layout, self.tokens, self.config)
        finally:
            self.handle.edits = base
            if checkpointing:
                model.disable_gradient_checkpointing()
        self.losses[step] = history
        return x.to(latents.dtype)


def _size(pipe: Any, family: str, height: int | None, width: int | None) -> tuple[int, int]:
    vsf = pipe.vae_scale_factor
    if family == "sd3":
        multiple, default = vsf * pipe.transformer.config.patch_size, pipe.default_sample_size * vsf
    else:
        multiple, default = vsf, pipe.unet.config.sample_size * vsf
    size = (default if height is None else height, default if width is None else width)
    for name, value in zip(("height", "width"), size):
        if not isinstance(value, int) or value <= 0 or value % multiple:
            raise ValueError(f"{name}={value!r} must be a positive multiple of {multiple} for this pipeline")
    return size


def _timesteps(pipe: Any, family: str, steps: int, latent: torch.Tensor) -> torch.Tensor:
    """The timesteps the pipeline will use (it sets them again itself, identically)."""
    extra = {}
    config = pipe.scheduler.config
    if family == "sd3" and config.get("use_dynamic_shifting", None):
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

        p = pipe.transformer.config.patch_size
        n = (latent.shape[-2] // p) * (latent.shape[-1] // p)
        extra["mu"] = calculate_shift(n, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                                      config.get("base_shift", 0.5), config.get("max_shift", 1.16))
    pipe.scheduler.set_timesteps(steps, device=latent.device, **extra)
    return pipe.scheduler.timesteps


def _step_callback(refocuser: _Refocuser, limit: int, user: Any) -> Any:
    """callback_on_step_end that refocuses the latent of step i + 1 (while i + 1 < limit), then runs ``user``."""

    def on_step_end(p: Any, i: int, t: Any, tensors: dict) -> dict:
        out = {}
        if i + 1 < limit:
            out["latents"] = refocuser(tensors["latents"], p.scheduler.timesteps[i + 1], i + 1)
        if user is not None:
            out.update(user(p, i, t, {**tensors, **out}) or {})
        return out

    return on_step_end


def _check_call(pipe: Any, layout: Any, handle: Installation | None, kwargs: dict) -> str:
    from ..families import detect_family
    from ..zoo import denoiser

    if not isinstance(layout, Layout):
        raise ValueError(  # noqa: TRY004 - the project's rule: bad inputs raise ValueError
            f"layout={layout!r} must be a Layout (Layout(prompt, regions) or Layout.from_json(path))")
    family = detect_family(denoiser(pipe)).name
    if family not in SUPPORTED:
        raise ValueError(f"refocusing supports SD 1.x, SDXL and SD3 pipelines; {type(pipe).__name__} is {family}")
    for name in ("prompt", "latents", "prompt_embeds"):
        if kwargs.get(name) is not None:
            raise ValueError(f"{name}= is set by refocus(); put the prompt in the layout")
    if kwargs.get("num_images_per_prompt", 1) != 1:
        raise ValueError(f"num_images_per_prompt={kwargs['num_images_per_prompt']}; refocus() makes one image per call")
    if handle is not None and handle.pipeline is not pipe:
        raise ValueError("handle= must be an installation on this pipeline (install(pipe, ...))")
    return family


def refocus(
    pipe: Any, layout: Layout, *, config: RefocusConfig | None = None, edits: tuple[Edit, ...] = (),
    handle: Installation | None = None, append_missing: bool = False, num_inference_steps: int = 50,
    height: int | None = None, width: int | None = None, generator: torch.Generator | None = None,
    max_sequence_length: int = 256, callback_on_step_end: Any = None, return_losses: bool = False, **kwargs: Any,
) -> Any:
    """Run ``pipe`` (SD 1.x, SDXL or SD3) on ``layout.prompt`` with attention refocusing toward ``layout``'s boxes.

    Returns the pipeline's output (and, with ``return_losses``, ``{step: [loss per iteration]}``). Extra
    ``kwargs`` go to the pipeline. A phrase missing from the prompt raises, unless ``append_missing``.

    >>> layout = Layout("a cat and a dog", [("a cat", [(0, 0, .5, 1)]), ("a dog", [(.5, 0, 1, 1)])])  # doctest: +SKIP
    >>> image = refocus(pipe, layout, generator=torch.Generator().manual_seed(0)).images[0]  # doctest: +SKIP
    """
    config = config or RefocusConfig()
    family = _check_call(pipe, layout, handle, kwargs)
    layout = layout.with_phrases_in_prompt() if append_missing else layout
    tokens = token_layout(pipe, layout, max_sequence_length)
    size = _size(pipe, family, height, width)
    if family == "sd3":
        kwargs["max_sequence_length"] = max_sequence_length
    with ExitStack() as stack:
        if handle is None:
            handle = stack.enter_context(install(pipe, *edits))
        elif edits:
            base = handle.edits
            handle.edits = (*base, *edits)
            stack.callback(setattr, handle, "edits", base)
        handle.new_run()
        model = handle.models[0]
        shape = (1, model.config.in_channels, size[0] // pipe.vae_scale_factor, size[1] // pipe.vae_scale_factor)
        noise = randn_tensor(shape, generator=generator, device=pipe._execution_device, dtype=model.dtype)
        timesteps = _timesteps(pipe, family, num_inference_steps, noise)
        forward = _conditioner(pipe, family, layout.prompt, size, max_sequence_length)
        sigma = float(getattr(pipe.scheduler, "init_noise_sigma", 1.0))
        x, limit = noise * sigma, min(config.refocus_steps, len(timesteps))
        recorders = _recorders(handle, pipe, forward, x, timesteps[0], config) if limit > 0 else []
        refocuser = _Refocuser(handle, forward, recorders, layout, config, tokens)
        if limit > 0:
            x = refocuser(x, timesteps[0], 0)
        handle.new_run()
        result = pipe(prompt=layout.prompt, latents=x / sigma, height=size[0],
                      width=size[1], num_inference_steps=num_inference_steps, generator=generator,
                      callback_on_step_end=_step_callback(refocuser, limit, callback_on_step_end), **kwargs)
    return (result, refocuser.losses) if return_losses else result
