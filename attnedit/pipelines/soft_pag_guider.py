"""SoftPAG as a guider for diffusers' modular pipelines: head-level perturbed-attention guidance.

diffusers' :class:`~diffusers.guiders.PerturbedAttentionGuidance` perturbs whole layers (identity attention through
layer-skip hooks). :class:`SoftPAGGuidance` has the same call interface but perturbs only the selected heads, softly:
each selected head's map becomes ``(1 - u) A + u I`` (the project's :class:`~attnedit.methods.head_guidance.SoftPAG` edit,
installed with :func:`attnedit.install` for the perturbed pass only). The guided prediction is the one
:func:`attnedit.methods.head_guidance.perturbed_guidance` gives stock pipelines::

    eps = eps_u + w_cfg (eps_c - eps_u) + w_pag (eps_c - eps_p)     (with CFG)
    eps = eps_c + w_pag (eps_c - eps_p)                              (without CFG)

A modular denoise loop calls ``prepare_models(denoiser)``, the denoiser, then ``cleanup_models(denoiser)`` once
per prediction, in the order cond, uncond, perturbed (here ``pred_cond``, ``pred_uncond``, ``pred_cond_skip``).
The edit processors go on in ``prepare_models`` of the perturbed pass and come off in ``cleanup_models``; a forward
hook with ``always_call=True`` also takes them off when the denoiser raises, since the loop then never reaches
``cleanup_models``. With ``share_prefix`` (DiT families) the cond pass keeps the outputs of the blocks before the
first perturbed one and the perturbed pass, whose inputs are the cond pass's, reuses them instead of recomputing.
"""

from __future__ import annotations

import math
import weakref
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.guiders.guider_utils import BaseGuidance, GuiderOutput, rescale_noise_cfg
from diffusers.hooks import ModelHook

from attnedit.core.attention import BACKENDS
from attnedit.core.install import install, unwrap_compiled
from attnedit.methods.head_guidance import (
    HeadSpec,
    SoftPAG,
    _prefix_blocks,
    _register,
    format_heads,
    head_presets,
    soft_pag,
)

if TYPE_CHECKING:
    from diffusers.modular_pipelines.modular_pipeline import BlockState

__all__ = ["SoftPAGGuidance"]

_SKIP_HOOK = "attnedit_soft_pag_prefix"


class _CachedBlock(ModelHook):
    """In the perturbed pass: return the block's output from the cond pass (same inputs) instead of recomputing."""

    def __init__(self, cache: dict[str, Any], name: str) -> None:
        super().__init__()
        self.cache, self.name = cache, name

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        cached = self.cache.get(self.name)
        return self.fn_ref.original_forward(*args, **kwargs) if cached is None else cached


class SoftPAGGuidance(BaseGuidance):
    """SoftPAG (Ahn et al. 2025, arXiv:2506.10978) on selected heads, as a modular-pipeline guider.

    Args:
        guidance_scale: the CFG weight ``w_cfg`` (CFG is off at 1.0, or at 0.0 with ``use_original_formulation``).
        perturbed_guidance_scale: the PAG weight ``w_pag`` (0 turns the perturbed pass off).
        heads: the perturbed heads, in any form :func:`~attnedit.methods.head_guidance.parse_heads` takes: ``"7:3,9:12"``,
            ``"L7H3 L9"``, ``"7:*"``, ``[(7, 3)]``, ``{7: None}``, the path of a HeadHunter ranking JSON or a shipped
            preset's name. Layers are numbered as in ``perturbed_guidance`` (the family adapter's index among
            joint-attention sites for SD3 and FLUX, self-attention sites for UNets and Wan). The config stores a
            preset by name (its family is checked on the model) and anything else canonically (``"7:3,9:12"``).
        strength: ``u`` in ``(1 - u) A + u I``; 1.0 is PAG's identity map on those heads, 0.0 turns the pass off.
        perturbed_guidance_start, perturbed_guidance_stop: the fraction of the steps where the perturbed pass runs,
            steps ``int(start * N) <= i < int(stop * N)``. Unlike diffusers' PAG guider (``start < i``, default
            0.01 .. 0.2) the start step is included and the default is every step, as in ``perturbed_guidance``.
        target: ``"identity"`` (PAG) or ``"uniform"`` (``(1 - u) A + u U``).
        scope: ``"all"`` the identity over the whole joint sequence (the SoftPAG paper); ``"image-image"`` only the
            image->image block (diffusers' SD3 PAG); ``"image"`` the identity on image rows only.
        share_prefix: reuse the cond pass's outputs of the blocks before the first perturbed one (DiT families).
        guidance_rescale, use_original_formulation, start, stop, enabled: as in diffusers' CFG / PAG guiders
            (``start`` / ``stop`` bound the CFG window).
        backend: the attnedit attention backend of the perturbed pass (``"auto"``).
    """

    _input_predictions: ClassVar[list[str]] = ["pred_cond", "pred_uncond", "pred_cond_skip"]

    @register_to_config
    def __init__(
        self,
        guidance_scale: float = 7.5,
        perturbed_guidance_scale: float = 2.8,
        heads: HeadSpec = None,
        strength: float = 1.0,
        perturbed_guidance_start: float = 0.0,
        perturbed_guidance_stop: float = 1.0,
        target: str = "identity",
        scope: str = "all",
        share_prefix: bool = True,
        guidance_rescale: float = 0.0,
        use_original_formulation: bool = False,
        start: float = 0.0,
        stop: float = 1.0,
        enabled: bool = True,
        backend: str = "auto",
    ) -> None:
        super().__init__(start, stop, enabled)
        if heads is None:
            raise ValueError("SoftPAGGuidance needs heads=, e.g. heads='7:3,9:12', 'L7' or a ranking JSON path")
        w = perturbed_guidance_scale
        if not isinstance(w, (int, float)) or isinstance(w, bool) or not math.isfinite(w) or w < 0:
            raise ValueError(f"perturbed_guidance_scale={w!r} must be a number >= 0 and finite (w_pag)")
        if not 0.0 <= perturbed_guidance_start <= perturbed_guidance_stop <= 1.0:
            raise ValueError(
                f"perturbed_guidance_start={perturbed_guidance_start}, perturbed_guidance_stop="
                f"{perturbed_guidance_stop} must satisfy 0 <= start <= stop <= 1 (fractions of the steps)"
            )
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r}; valid: {list(BACKENDS)}")
        # the edit checks strength, target and scope; build one now so bad values fail here, not mid-run
        SoftPAG(heads={0: (0,)}, strength=strength, target=target, scope=scope)
        # syntax checked (a ranking file read) now, layers on the model; a preset keeps its name for its family check
        preset = isinstance(heads, str) and heads.strip() in head_presets()
        self.heads = heads.strip() if preset else format_heads(heads)
        self.register_to_config(heads=self.heads)
        self.guidance_scale = guidance_scale
        self.perturbed_guidance_scale = perturbed_guidance_scale
        self.strength = strength
        self.perturbed_guidance_start = perturbed_guidance_start
        self.perturbed_guidance_stop = perturbed_guidance_stop
        self.target, self.scope, self.share_prefix, self.backend = target, scope, share_prefix, backend
        self.guidance_rescale = guidance_rescale
        self.use_original_formulation = use_original_formulation
        self._resolved: tuple[weakref.ref, SoftPAG, list[str]] | None = None
        self._prefix_cache: dict[str, Any] = {}
        self._pass: ExitStack | None = None

    # -- which predictions this step needs ---------------------------------------------------------------------
    def _predictions(self) -> list[tuple[int, str]]:
        """(tuple index of the inputs, prediction name) per pass, in the order the loop runs them."""
        passes = [(0, "pred_cond")]
        if self._is_cfg_enabled():
            passes.append((1, "pred_uncond"))
        if self._is_pag_enabled():
            passes.append((0, "pred_cond_skip"))  # the perturbed pass reads the cond inputs
        return passes

    def _current_pass(self) -> str:
        passes = self._predictions()
        return passes[min(max(self._count_prepared, 1), len(passes)) - 1][1]

    def prepare_inputs(self, data: dict[str, Any]) -> list[BlockState]:
        return [self._prepare_batch(data, index, name) for index, name in self._predictions()]

    def prepare_inputs_from_block_state(
        self, data: BlockState, input_fields: dict[str, str | tuple[str, str]]
    ) -> list[BlockState]:
        return [self._prepare_batch_from_block_state(input_fields, data, i, name) for i, name in self._predictions()]

    @property
    def num_conditions(self) -> int:
        return len(self._predictions())

    @property
    def is_conditional(self) -> bool:
        return self._current_pass() != "pred_uncond"

    def set_state(self, step: int, num_inference_steps: int, timestep: torch.LongTensor) -> None:
        super().set_state(step, num_inference_steps, timestep)
        self._release()
        self._prefix_cache.clear()

    def _in_window(self, start: float, stop: float) -> bool:
        if self._num_inference_steps is None:
            return True
        return int(start * self._num_inference_steps) <= self._step < int(stop * self._num_inference_steps)

    def _is_cfg_enabled(self) -> bool:
        off = 0.0 if self.use_original_formulation else 1.0
        return self._enabled and self._in_window(self._start, self._stop) and not math.isclose(self.guidance_scale, off)

    def _is_pag_enabled(self) -> bool:
        return (
            self._enabled
            and self._in_window(self.perturbed_guidance_start, self.perturbed_guidance_stop)
            and not math.isclose(self.perturbed_guidance_scale, 0.0)
            and self.strength > 0.0
        )

    # -- model preparation: the SoftPAG edit on the perturbed pass only ----------------------------------------
    def resolve(self, denoiser: torch.nn.Module) -> SoftPAG:
        """The SoftPAG edit for ``denoiser``: heads checked against its sites (ValueError naming a missing one)."""
        model = unwrap_compiled(denoiser)
        if self._resolved is None or self._resolved[0]() is not model:
            edit = soft_pag(model, self.heads, self.strength, target=self.target, scope=self.scope,
                            branches=frozenset({"perturbed"}))
            with install(model) as probe:
                share = self.share_prefix and probe.family.share_prefix
                prefix = _prefix_blocks(probe, edit) if share else []
            self._resolved = (weakref.ref(model), edit, prefix)
        return self._resolved[1]

    def prepare_models(self, denoiser: torch.nn.Module) -> None:
        self._count_prepared += 1
        self._release()  # a pass whose denoiser raised before cleanup_models
        edit = self.resolve(denoiser)  # every pass, so a bad head fails at the first step, not at the window
        name, prefix = self._current_pass(), self._resolved[2]
        if name == "pred_uncond" or not self._is_pag_enabled():
            return
        if name == "pred_cond" and not prefix:
            return
        stack = ExitStack()
        self._pass = stack
        try:
            model = unwrap_compiled(denoiser)
            modules = dict(model.named_modules())
            if name == "pred_cond":  # keep the prefix blocks' outputs for the perturbed pass
                for block in prefix:
                    handle = modules[block].register_forward_hook(self._keeper(block))
                    stack.callback(handle.remove)
            else:
                for block in prefix if self._prefix_cache else []:
                    _register(stack, modules[block], _CachedBlock(self._prefix_cache, block), _SKIP_HOOK)
                stack.callback(self._prefix_cache.clear)
                installation = stack.enter_context(install(model, edit, backend=self.backend))
                stack.enter_context(installation.branches("perturbed"))
            handle = denoiser.register_forward_hook(lambda *_: self._release(), always_call=True)
            stack.callback(handle.remove)
        except BaseException:
            self._release()
            raise

    def _keeper(self, block: str):
        def keep(module: torch.nn.Module, args: tuple, output: Any) -> None:
            self._prefix_cache[block] = output

        return keep

    def cleanup_models(self, denoiser: torch.nn.Module) -> None:
        self._release()

    def _release(self) -> None:
        """Restore processors and remove every hook of the current pass (idempotent)."""
        stack, self._pass = self._pass, None
        if stack is not None:
            stack.close()

    # -- guidance ------------------------------------------------------------------------------------------------
    def forward(
        self,
        pred_cond: torch.Tensor,
        pred_uncond: torch.Tensor | None = None,
        pred_cond_skip: torch.Tensor | None = None,
    ) -> GuiderOutput:
        """``eps_u + w_cfg (eps_c - eps_u) + w_pag (eps_c - eps_p)``, each term only when its pass ran."""
        pred = pred_cond
        if self._is_cfg_enabled():
            base = pred_cond if self.use_original_formulation else pred_uncond
            pred = base + self.guidance_scale * (pred_cond - pred_uncond)
        if self._is_pag_enabled():
            pred = pred + self.perturbed_guidance_scale * (pred_cond - pred_cond_skip)
        if self.guidance_rescale > 0.0:
            pred = rescale_noise_cfg(pred, pred_cond, self.guidance_rescale)
        return GuiderOutput(pred=pred, pred_cond=pred_cond, pred_uncond=pred_uncond)
