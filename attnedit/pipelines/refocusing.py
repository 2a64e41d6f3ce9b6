"""Attention refocusing on stock diffusers pipelines (SD 1.x, SDXL, SD3, FLUX.1, GLIGEN): :func:`refocus`.

Phung, Ge and Huang (2024), "Grounded Text-to-Image Synthesis with Attention Refocusing" (arXiv:2306.05427); the
losses and the schedule live in :mod:`attnedit.methods.refocusing`. The stock pipeline runs unchanged: the initial noise
is drawn exactly as the pipeline would draw it (same generator, same numbers; packed for FLUX), refocused for step
0 and passed as ``latents=``; for steps 1..N-1, ``callback_on_step_end`` refocuses the latent the pipeline will
denoise next (against ``timesteps[i + 1]``), on the steps the schedule (``RefocusConfig.schedule``) refocuses;
GLIGEN's pipeline has no such callback, so its ``scheduler.step`` is wrapped instead
(:mod:`attnedit.pipelines.refocusing_gligen`, which also passes GLIGEN's grounding inputs). Each refocusing iteration is one extra conditional-only forward with
gradients (``handle.branches("cond")``) whose attention maps are recorded at one resolution:

* SD 1.x: cross/self layers whose grid is latent / 4 (16x16 at 512 px, the paper's layers);
* SDXL: latent / 2 (64x64 at 1024 px: down_blocks.1 and up_blocks.1, the middle of its three resolutions);
* UNets without that grid, or where it is under 8x8 (tiny and built-in models), use the grid nearest to 16x16
  (the paper's map size) that is at least 8x8, the finer one on a tie;
* SD3: every joint block (or ``config.layers``): image queries -> text keys (CAR), -> image keys (SAR);
* FLUX: the double-stream blocks (``config.single_stream`` adds the single-stream ones): image queries -> T5 text
  keys (CAR), -> image keys (SAR). FLUX.1 is guidance-distilled: one pass per step, which is the cond branch.

Cost: that forward stops right after the last recorded attention call (a private exception raised by a forward
hook on its module, caught here), so only the network's prefix in front of it runs forward and backward; the
model's parameters are frozen meanwhile (no activation is kept for weight gradients); the installation's step
counter is restored afterwards, so the pipeline's own forwards see the steps and branches they would see without
refocusing. Gradient checkpointing (``RefocusConfig.gradient_checkpointing``) is on by default for FLUX.

Other edits (``edits=``) apply to the pipeline's forwards and to the refocusing forwards; pass ``handle=`` to run
inside an existing installation, e.g. ``with perturbed_guidance(pipe, ...) as h: refocus(pipe, layout, handle=h)``.
"""

from __future__ import annotations

import dataclasses
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.utils.torch_utils import randn_tensor

from attnedit.core.edits import Edit
from attnedit.core.families import Family
from attnedit.core.family_hooks import ImagePipelineHooks
from attnedit.core.install import Installation, install
from attnedit.methods.refocusing import (
    PLAIN_LOSS_SCALE,
    Layout,
    MapRecorder,
    RefocusConfig,
    TokenLayout,
    refocus_latents,
    token_layout,
)
from attnedit.pipelines import refocusing_gligen as gligen
from attnedit.pipelines.refocusing_maps import PAPER_GRID, _recorders, map_layers  # noqa: F401  (re-exported)


def refocus_hooks(family: Family) -> ImagePipelineHooks | None:
    """The family's image-pipeline hooks if refocusing can drive its pipelines (a conditioner is declared)."""
    hooks = family.image_pipeline
    return hooks if hooks is not None and hooks.conditioner is not None else None


def _conditioner(pipe: Any, family: str, prompt: str, size: tuple[int, int], max_sequence_length: int,
                 guidance_scale: float | None = None) -> Any:
    """forward(x, t): the conditional denoiser call of the pipeline, batch 1 (the family's conditioner hook)."""
    return _hooks(family).conditioner(pipe, prompt, size, max_sequence_length, guidance_scale)


def _hooks(family: str | ImagePipelineHooks) -> ImagePipelineHooks:
    """The image-pipeline hooks of a family given by name (benchmarks, tests) or the hooks themselves."""
    from attnedit.families import get_family

    return get_family(family).image_pipeline if isinstance(family, str) else family


# per model: {latent shape: {site: grid}} from one probing forward (the grids depend on the architecture only)
class _StopForward(Exception):
    """Raised right after the last attention call whose maps the losses read; the forward that raised is done."""


class _Prefix:
    """Forward hook on the module of the last recorded site; armed for one forward at a time (a checkpointed
    block's recomputation during the backward pass runs it again, disarmed)."""

    def __init__(self) -> None:
        self.armed = False

    def __call__(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if self.armed:
            self.armed = False
            raise _StopForward


def _covered_sites(handle: Installation, recorders: list[MapRecorder]) -> list:
    """The sites (in forward order) at least one recorder reads."""
    return [s for s in handle.sites
            if any((r.kinds is None or s.kind in r.kinds) and (r.layers is None or s.layer in r.layers) for r in recorders)]


@dataclass
class _Refocuser:
    """Refocuses one latent at one step, with the recorders added to the installation only meanwhile.

    The gradient forward runs up to the last recorded site (``config.prefix_only``); the first one checks that
    every site the recorders cover was recorded before the stop, else prefix truncation is turned off.
    """

    handle: Installation
    forward: Any
    recorders: list[MapRecorder]
    layout: Layout
    config: RefocusConfig
    tokens: TokenLayout
    num_steps: int = 50  # the run's inference steps: the schedule's tables are read at step i * 50 // num_steps
    prepare: Any = None  # prepare(step): a context for the gradient forwards of ``step`` (GLIGEN: the fuser)
    losses: dict[int, list[float]] = field(default_factory=dict)
    checked: bool = False
    transient: bool = False  # install the processors only while refocusing (``handle`` was removed)

    def __post_init__(self) -> None:
        self.expected = set(_covered_sites(self.handle, self.recorders))
        last = [s for s in self.handle.sites if s in self.expected][-1:] if self.config.prefix_only else []
        self.stop_site = last[0] if last else None

    def _run(self, z: torch.Tensor, t: torch.Tensor, stop: _Prefix | None) -> None:
        if stop is None or self.stop_site is None:
            self.forward(z, t)
            return
        stop.armed = True
        try:
            self.forward(z, t)
        except _StopForward:
            pass
        finally:
            stop.armed = False
        if not self.checked:
            self.checked = True
            seen = {m.site for r in self.recorders for m in r.maps}
            if not self.expected <= seen:  # a covered site runs after the stop: record from full forwards
                self.stop_site = None
                for r in self.recorders:
                    r.clear()
                self.forward(z, t)

    def __call__(self, latents: torch.Tensor, t: torch.Tensor, step: int) -> torch.Tensor:
        if not self.transient:
            return self._refocus(self.handle, latents, t, step)
        self.handle.attach()  # the same installation (sites, run state), put back on for this step only
        try:
            return self._refocus(self.handle, latents, t, step)
        finally:
            self.handle.remove()

    def _refocus(self, handle: Installation, latents: torch.Tensor, t: torch.Tensor, step: int) -> torch.Tensor:
        models = handle.models
        base, model, state = handle.edits, models[0], handle.state
        wanted = self.config.gradient_checkpointing
        wanted = handle.family.image_pipeline.gradient_checkpointing if wanted is None else wanted
        checkpointing = wanted and not model.is_gradient_checkpointing
        saved = (state.step, state.pass_index, state.last_t, state.direction)
        frozen = [p for m in models for p in m.parameters() if p.requires_grad]
        stop, hook = None, None
        handle.edits = (*base, *self.recorders)
        try:
            for p in frozen:  # the latent is the only leaf: no activation is saved for weight gradients
                p.requires_grad_(False)
            if self.stop_site is not None:
                stop = _Prefix()
                hook = dict(model.named_modules())[self.stop_site.name].register_forward_hook(stop)
            if checkpointing:
                model.enable_gradient_checkpointing()
            state.auxiliary = True  # guidance hooks (perturbed_guidance) leave these forwards alone
            with handle.branches("cond"), (self.prepare(step) if self.prepare else nullcontext()):
                x, history = refocus_latents(lambda z: self._run(z, t, stop), latents, step, self.recorders,
                                             self.layout, self.tokens, self.config, self.num_steps)
        finally:
            handle.edits = base
            state.auxiliary = False
            if hook is not None:
                hook.remove()
            if checkpointing:
                model.disable_gradient_checkpointing()
            for p in frozen:
                p.requires_grad_(True)
            # the pipeline's next forward counts as if the refocusing forwards had not run (step, pass, branch)
            state.step, state.pass_index, state.last_t, state.direction = saved
        self.losses[step] = history
        return x.to(latents.dtype)


def _size(pipe: Any, hooks: str | ImagePipelineHooks, height: int | None, width: int | None) -> tuple[int, int]:
    multiple, default = _hooks(hooks).size(pipe)
    size = (default if height is None else height, default if width is None else width)
    for name, value in zip(("height", "width"), size):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0 or value % multiple:
            raise ValueError(f"{name}={value!r} must be a positive multiple of {multiple} for this pipeline")
    return size


def _timesteps(pipe: Any, hooks: str | ImagePipelineHooks, steps: int, latent: torch.Tensor,
               sigmas: Any = None) -> torch.Tensor:
    """The timesteps the pipeline will use (it sets them again itself, identically)."""
    hooks = _hooks(hooks)
    if hooks.timesteps is not None:
        return hooks.timesteps(pipe, steps, latent, sigmas)
    pipe.scheduler.set_timesteps(steps, device=latent.device)
    return pipe.scheduler.timesteps


def _initial_noise(pipe: Any, hooks: str | ImagePipelineHooks, model: torch.nn.Module, size: tuple[int, int],
                   generator: torch.Generator | None) -> torch.Tensor:
    """The noise the pipeline would draw itself (packed where the family's pipeline packs latents)."""
    hooks = _hooks(hooks)
    if hooks.noise is not None:
        return hooks.noise(pipe, model, size, generator)
    shape = (1, model.config.in_channels, size[0] // pipe.vae_scale_factor, size[1] // pipe.vae_scale_factor)
    return randn_tensor(shape, generator=generator, device=pipe._execution_device, dtype=model.dtype)


def _refocus_next(refocuser: _Refocuser, pipe: Any) -> Any:
    """next(i, latents): the latent of step i + 1 refocused if the schedule refocuses that step, else None."""
    def refocus_next(i: int, latents: torch.Tensor) -> torch.Tensor | None:
        timesteps = pipe.scheduler.timesteps
        if i + 1 >= len(timesteps) or not refocuser.config.refocuses(i + 1, refocuser.num_steps):
            return None
        return refocuser(latents, timesteps[i + 1], i + 1)

    return refocus_next


def _step_callback(refocuser: _Refocuser, user: Any) -> Any:
    """callback_on_step_end that refocuses the latent of step i + 1 (if scheduled), then runs ``user``."""
    refocus_next = _refocus_next(refocuser, refocuser.handle.pipeline)

    def on_step_end(p: Any, i: int, t: Any, tensors: dict) -> dict:
        out = {}
        new = refocus_next(i, tensors["latents"])
        if new is not None:
            out["latents"] = new
        if user is not None:
            out.update(user(p, i, t, {**tensors, **out}) or {})
        return out

    return on_step_end


def _check_call(pipe: Any, layout: Any, handle: Installation | None, kwargs: dict) -> ImagePipelineHooks:
    from attnedit.families import detect_family
    from attnedit.models.zoo import denoiser

    if not isinstance(layout, Layout):
        raise ValueError(  # noqa: TRY004 - the project's rule: bad inputs raise ValueError
            f"layout={layout!r} must be a Layout (Layout(prompt, regions) or Layout.from_json(path))")
    family = detect_family(denoiser(pipe))
    hooks = refocus_hooks(family)
    if any(c.__name__.startswith("StableDiffusionGLIGEN") for c in type(pipe).__mro__) and not gligen.is_gligen(pipe):
        raise ValueError(f"refocusing on GLIGEN supports StableDiffusionGLIGENPipeline (text boxes); got "
                         f"{type(pipe).__name__}")
    if hooks is None:
        raise ValueError(f"refocusing supports SD 1.x, SDXL, SD3 and FLUX.1 pipelines; {type(pipe).__name__} is "
                         f"{family.name}")
    if hooks.pipelines and not any(c.__name__ in hooks.pipelines for c in type(pipe).__mro__):
        raise ValueError(f"refocusing on {family.name.upper()} supports {', '.join(hooks.pipelines)} (text to image); got "
                         f"{type(pipe).__name__}")
    for name in ("prompt", "prompt_2", "prompt_3", "latents", "prompt_embeds"):
        if kwargs.get(name) is not None:
            raise ValueError(f"{name}= is set by refocus(); put the prompt in the layout")
    if kwargs.get("num_images_per_prompt", 1) != 1:
        raise ValueError(f"num_images_per_prompt={kwargs['num_images_per_prompt']}; refocus() makes one image per call")
    if handle is not None and handle.pipeline is not pipe:
        raise ValueError("handle= must be an installation on this pipeline (install(pipe, ...))")
    return hooks


def refocus(
    pipe: Any, layout: Layout, *, config: RefocusConfig | None = None, edits: tuple[Edit, ...] = (),
    handle: Installation | None = None, append_missing: bool = False, num_inference_steps: int = 50,
    height: int | None = None, width: int | None = None, generator: torch.Generator | None = None,
    max_sequence_length: int = 256, callback_on_step_end: Any = None, return_losses: bool = False, **kwargs: Any,
) -> Any:
    """Run ``pipe`` (SD 1.x, SDXL, SD3, FLUX.1 or GLIGEN) on ``layout.prompt`` with attention refocusing toward
    ``layout``'s boxes, on the steps of ``config.schedule`` (default ``"ce0439c"``).

    Returns the pipeline's output (and, with ``return_losses``, ``{step: [loss per iteration]}``). Extra
    ``kwargs`` go to the pipeline. A phrase missing from the prompt raises, unless ``append_missing``.
    ``max_sequence_length`` is the T5 length of SD3 and FLUX (the text keys phrases are located among).
    GLIGEN: ``gligen_phrases``/``gligen_boxes`` default to one phrase per layout box; ``loss_scale`` defaults to 1
    there (the authors' code) and to 40 elsewhere (their advice for plain Stable Diffusion).

    >>> layout = Layout("a cat and a dog", [("a cat", [(0, 0, .5, 1)]), ("a dog", [(.5, 0, 1, 1)])])  # doctest: +SKIP
    >>> image = refocus(pipe, layout, generator=torch.Generator().manual_seed(0)).images[0]  # doctest: +SKIP
    """
    config = config or RefocusConfig()
    hooks = _check_call(pipe, layout, handle, kwargs)
    is_gligen = gligen.is_gligen(pipe)
    if is_gligen:
        if callback_on_step_end is not None:
            raise ValueError(f"callback_on_step_end= is not accepted by {type(pipe).__name__}; pass its callback=")
        gligen.grounding_inputs(pipe, layout, kwargs)
    if config.loss_scale is None:  # the authors' code on GLIGEN; their advice for plain Stable Diffusion
        config = dataclasses.replace(config, loss_scale=1.0 if is_gligen else PLAIN_LOSS_SCALE)
    layout = layout.with_phrases_in_prompt() if append_missing else layout
    tokens = token_layout(pipe, layout, max_sequence_length)
    size = _size(pipe, hooks, height, width)
    if hooks.text_length:
        kwargs["max_sequence_length"] = max_sequence_length
    with ExitStack() as stack:
        installed = handle is None
        if installed:
            handle = stack.enter_context(install(pipe, *edits))
        elif edits:
            base = handle.edits
            handle.edits = (*base, *edits)
            stack.callback(setattr, handle, "edits", base)
        handle.new_run()
        model = handle.models[0]
        noise = _initial_noise(pipe, hooks, model, size, generator)
        timesteps = _timesteps(pipe, hooks, num_inference_steps, noise, kwargs.get("sigmas"))
        if is_gligen:
            forward = gligen.conditioner(pipe, layout.prompt, kwargs)
            prepare = gligen.fuser_schedule(pipe, kwargs, len(timesteps))
        else:
            forward = hooks.conditioner(pipe, layout.prompt, size, max_sequence_length, kwargs.get("guidance_scale"))
            prepare = None
        sigma = float(getattr(pipe.scheduler, "init_noise_sigma", 1.0))
        x = noise * sigma
        any_step = any(config.refocuses(i, num_inference_steps) for i in range(len(timesteps)))
        recorders = []
        if any_step:
            with prepare(0) if prepare else nullcontext():
                recorders = _recorders(handle, pipe, forward, x, timesteps[0], config)
        # without other edits the pipeline's own forwards need no processor: install them only while refocusing
        transient = installed and not edits
        refocuser = _Refocuser(handle, forward, recorders, layout, config, tokens, num_inference_steps, prepare,
                               transient=transient)
        if transient:
            handle.remove()
        if config.refocuses(0, num_inference_steps):
            x = refocuser(x, timesteps[0], 0)
        handle.new_run()
        call = {"prompt": layout.prompt, "latents": x / sigma, "height": size[0], "width": size[1],
                "num_inference_steps": num_inference_steps, "generator": generator, **kwargs}
        if is_gligen:
            with gligen.after_each_step(pipe, _refocus_next(refocuser, pipe) if any_step else lambda i, z: None):
                result = pipe(**call)
        else:
            result = pipe(**call, callback_on_step_end=_step_callback(refocuser, callback_on_step_end))
    return (result, refocuser.losses) if return_losses else result
