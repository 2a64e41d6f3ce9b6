"""Head-level perturbed-attention guidance: SoftPAG on selected heads, applied to stock diffusers pipelines.

Implements SoftPAG from Ahn et al. (2025), "Fine-Grained Perturbation Guidance via Attention Head Selection"
(arXiv:2506.10978), on top of Perturbed-Attention Guidance (Ahn et al. 2024, arXiv:2403.17377).

For each selected (layer, head) the attention map becomes ``A' = (1 - u) A + u I``; since ``A' V = (1 - u) A V
+ u V`` the core's :class:`~attnedit.core.edits.HeadBlend` blends the fused attention output with V per head and never
builds an S x S map. The perturbed prediction ``eps_p`` then guides away from the weak model::

    eps = eps_u + w_cfg (eps_c - eps_u) + w_pag (eps_c - eps_p)     (with CFG)
    eps = eps_c + w_pag (eps_c - eps_p)                              (without CFG, e.g. FLUX guidance-distilled)

:func:`perturbed_guidance` wraps the denoiser's forward with a removable diffusers ``ModelHook``: when the
pipeline asks for the conditional prediction, the hook also runs the perturbed branch (one more copy of the cond
rows) and returns ``eps_c + (w_pag / w_cfg) (eps_c - eps_p)`` in place of ``eps_c``, so the pipeline's own
guidance line yields the formula above. On DiT families the perturbed rows equal the cond rows up to the first
perturbed block, so that prefix runs once and is copied (``share_prefix``).

Head sets are written ``"7:3,9:12"``, ``"L7H3,L9H12"`` or ``"L7"`` (every head of layer 7); a layer is the
family adapter's index among self-attention (UNet, Wan) or joint-attention (SD3, FLUX, HunyuanVideo) sites.
On joint [image; text] attention ``scope`` says which part of the map is perturbed (:mod:`attnedit.core.perturbation`):
``"all"`` (default) the identity over the whole sequence (the SoftPAG paper, HeadHunter); ``"image-image"`` only the
image->image block, an image query keeping its own key and every text key (diffusers' SD3 PAG pipelines, which it
equals); ``"image"`` the identity on image rows only (text keys dropped too).
"""

from __future__ import annotations

import copy
import functools
import json
import math
import numbers
import os
import pathlib
import re
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook

from attnedit.core.edits import HeadBlend
from attnedit.core.families import Site
from attnedit.core.install import Installation, install, unwrap_compiled
from attnedit.families import get_family

__all__ = [
    "SoftPAG", "format_heads", "head_presets", "load_heads", "parse_heads", "perturbed_guidance",
    "resolve_heads", "soft_pag",
]

# The attention kind whose heads are perturbed, per family (SD3.5's extra attn2 is "self": not perturbed).
HeadSpec = Any  # str | list[(layer, head | None)] | dict[int, tuple[int, ...] | None] | path to a ranking JSON
_ITEM = re.compile(r"^(?:(\d+):(\d+|\*)|L(\d+)(?:H(\d+))?)$", re.IGNORECASE)
_HOOK = "attnedit_pag"
PRESETS = pathlib.Path(__file__).parent / "presets"  # HeadHunter rankings shipped per model: <model>.json


# ------------------------------------------------------------------------------------------- head-set syntax
def parse_heads(spec: HeadSpec) -> list[tuple[int, int | None]]:
    """Parse a head set into sorted (layer, head) pairs; head None = every head of that layer.

    Accepts ``"7:3,9:12"``, ``"L7H3 L9H12"``, ``"L7"`` / ``"7:*"`` (all heads of layer 7), a list of pairs, a
    ``{layer: heads | None}`` dict, the path of a HeadHunter ranking JSON, or a shipped preset's name
    (:func:`head_presets`, e.g. ``"shapes-t2i"``).
    """
    if isinstance(spec, os.PathLike) or (isinstance(spec, str) and spec.endswith(".json")):
        return parse_heads(load_heads(spec))
    if isinstance(spec, str) and spec.strip() in _shipped_presets():
        return parse_heads(load_heads(PRESETS / f"{spec.strip()}.json"))
    if isinstance(spec, dict):
        pairs = [(k, h) for k, hs in spec.items() for h in _dict_heads(spec, hs)]
    elif isinstance(spec, str):
        pairs = [_parse_item(item) for item in re.split(r"[,\s]+", spec.strip()) if item]
    elif isinstance(spec, (list, tuple)):
        pairs = [_pair(p) for p in spec]
    else:
        raise ValueError(f"heads={spec!r} must be a string like '7:3,9:12' or 'L7H3,L9', a list of (layer, head) or a dict")  # noqa: TRY004
    if not pairs:
        raise ValueError(f"heads={spec!r} selects no head; give at least one, e.g. '7:3' or 'L7' (all heads of layer 7)")
    for layer, head in pairs:
        if not _index(layer) or not (head is None or _index(head)):
            raise ValueError(f"heads={spec!r}: ({layer!r}, {head!r}) is not a (layer >= 0, head >= 0 or None) pair of integers")
    pairs = [(int(layer), None if head is None else int(head)) for layer, head in pairs]
    whole = {layer for layer, head in pairs if head is None}  # "L7" absorbs "L7H3"
    pairs = {(layer, head) for layer, head in pairs if head is None or layer not in whole}
    return sorted(pairs, key=lambda p: (p[0], -1 if p[1] is None else p[1]))


def _parse_item(item: str) -> tuple[int, int | None]:
    match = _ITEM.match(item)
    if match is None:
        raise ValueError(f"head {item!r} is not 'layer:head' (7:3), 'layer:*' (7:*), 'L<layer>H<head>' (L7H3), 'L<layer>' (L7) "
                         f"or a preset ({', '.join(sorted(_shipped_presets())) or 'none shipped'})")
    a, b, c, d = match.groups()
    if a is not None:
        return int(a), None if b == "*" else int(b)
    return int(c), None if d is None else int(d)


def _index(value: Any) -> bool:
    """A layer or head index: an integer >= 0 (not a bool, not a float that happens to be whole)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 0


def _pair(p: Any) -> tuple[Any, Any]:
    """A list entry: ``(layer, head)`` or an item string ("L7H3"); the indices are checked by parse_heads."""
    if isinstance(p, str):
        return _parse_item(p)
    if not isinstance(p, (list, tuple)) or len(p) != 2:
        raise ValueError(f"head {p!r} must be a (layer, head) pair")
    return p[0], p[1]


def _dict_heads(spec: dict, heads: Any) -> list[Any]:
    """The heads of one ``{layer: heads}`` entry: None (every head), one index, or a list / tuple / set of them."""
    if heads is None or _index(heads):
        return [heads]
    if not isinstance(heads, (list, tuple, set, frozenset, range)):
        raise ValueError(f"heads={spec!r}: the heads of a layer must be None, an index or a list of indices, not {heads!r}")  # noqa: TRY004
    return list(heads)


def format_heads(heads: HeadSpec) -> str:
    """Canonical text of a head set: ``"7:3,9:12"``; a whole layer is ``"7:*"``."""
    return ",".join(f"{layer}:{'*' if head is None else head}" for layer, head in parse_heads(heads))


def load_heads(path: str | os.PathLike) -> list[tuple[int, int | None]]:
    """The selected heads of a HeadHunter ranking file (``{"heads": [[layer, head], ...], ...}``), in its order."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"heads={str(path)!r} is not a readable ranking JSON file: {error}") from error
    if not isinstance(data, dict) or not isinstance(data.get("heads"), list):
        raise ValueError(f"heads={str(path)!r}: a ranking file needs a 'heads' list of [layer, head] pairs")  # noqa: TRY004
    pairs = [_pair(p) for p in data["heads"]]
    parse_heads(pairs)  # the same checks as every other head set (ValueError naming the file's entry)
    return [(int(layer), None if head is None else int(head)) for layer, head in pairs]


def head_presets() -> dict[str, dict[str, Any]]:
    """The shipped head presets, ``{name: ranking}``: the heads a HeadHunter search found for that model (with
    its family, objective, search settings and held-out evaluation), nameable wherever heads are taken."""
    return copy.deepcopy(_shipped_presets())


@functools.cache
def _shipped_presets() -> dict[str, dict[str, Any]]:
    """The preset files, read once (every head-set parse checks a name against them)."""
    presets = {}
    for path in sorted(PRESETS.glob("*.json")):
        with open(path, encoding="utf-8") as f:
            presets[path.stem] = json.load(f)
    return presets


def resolve_heads(spec: HeadSpec, sites: list[Site], family: str) -> dict[int, tuple[int, ...]]:
    """Validate a head set against a model's sites; returns ``{layer: heads}`` with whole layers expanded."""
    preset = _shipped_presets().get(spec.strip()) if isinstance(spec, str) else None
    if preset is not None and preset.get("family") not in (None, family):
        raise ValueError(f"heads={spec!r} is the preset of {preset.get('model')} (a {preset['family']} model); "
                         f"this model is {family}: search its own heads (attnedit heads) or name them")
    kind = get_family(family).perturbed_kind
    counts = {s.layer: s.heads for s in sites if s.kind == kind}
    if not counts:
        raise ValueError(f"heads={spec!r}: this {family} model has no {kind}-attention layer to perturb")
    resolved: dict[int, set[int]] = {}
    for layer, head in parse_heads(spec):
        if layer not in counts:
            raise ValueError(f"heads={format_heads(spec)!r} names layer {layer}; {family} has {kind}-attention layers 0..{max(counts)}")
        if head is not None and head >= counts[layer]:
            raise ValueError(f"heads={format_heads(spec)!r} names head {head} of layer {layer}; it has heads 0..{counts[layer] - 1}")
        resolved.setdefault(layer, set()).update(range(counts[layer]) if head is None else {head})
    return {layer: tuple(sorted(hs)) for layer, hs in sorted(resolved.items())}


# -------------------------------------------------------------------------------------------------- the edit
@dataclass(frozen=True, kw_only=True)
class SoftPAG(HeadBlend):
    """SoftPAG on explicit heads: each selected head's map becomes (1 - u) A + u I (``target="identity"``) or
    (1 - u) A + u U with U uniform (``"uniform"``). ``heads`` is a ``{layer: heads}`` dict or a string with
    explicit heads (``"7:3,9:12"``); use :func:`soft_pag` for whole layers (``"L7"``), which needs the model.
    """

    def __post_init__(self) -> None:
        if self.heads is None:
            raise ValueError("SoftPAG heads=None selects no head; give e.g. heads='7:3,9:12' or use soft_pag(pipe, 'L7')")
        if not isinstance(self.heads, dict):
            pairs = parse_heads(self.heads)
            if any(h is None for _, h in pairs):
                raise ValueError(f"heads={self.heads!r} names whole layers; use soft_pag(pipe, heads) so head counts are known")
            object.__setattr__(self, "heads", {l: tuple(h for k, h in pairs if k == l) for l, _ in pairs})
        super().__post_init__()

    def __repr__(self) -> str:
        return f"SoftPAG(u={self.strength}, heads={format_heads(self.heads)!r}, target={self.target!r}, scope={self.scope!r})"


def soft_pag(model: Any, heads: HeadSpec, strength: float = 1.0, **options: Any) -> SoftPAG:
    """A :class:`SoftPAG` edit for ``model`` (pipeline or denoiser), head set validated against its sites.

    >>> edit = soft_pag(pipe, "L1,0:2", strength=0.5)          # doctest: +SKIP
    >>> with install(pipe, edit): image = pipe("a cat").images[0]   # doctest: +SKIP
    """
    with install(model) as probe:
        sites, family = probe.sites, probe.family.name
    kind = probe.family.perturbed_kind
    unknown = sorted(set(options) - _OPTIONS)
    if unknown:
        raise ValueError(f"soft_pag got unknown option(s) {unknown}; valid: {sorted(_OPTIONS)}")
    return SoftPAG(heads=resolve_heads(heads, sites, family), strength=strength, kinds=frozenset({kind}), **options)


_OPTIONS = {"target", "scope", "steps", "branches"}  # SoftPAG's fields soft_pag passes on (heads and kinds it sets)


# ------------------------------------------------------------------------------------------------- guidance
def _map_tensors(obj: Any, fn) -> Any:
    """Apply ``fn`` to every tensor in nested tuples / lists / dicts (other values pass through)."""
    if torch.is_tensor(obj):
        return fn(obj)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_map_tensors(o, fn) for o in obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    return obj


def _take_rows(obj: Any, index: torch.Tensor, batch: int) -> Any:
    """Re-index the batch axis of every tensor with ``batch`` rows (other tensors, e.g. rotary tables, pass).

    A list of ``batch`` tensors is a batch of rows itself (Z-Image's latents and captions): its items are re-indexed.
    """
    if isinstance(obj, list) and len(obj) == batch and all(torch.is_tensor(o) for o in obj):
        return [obj[i] for i in index.tolist()]
    if isinstance(obj, (tuple, list)):
        return type(obj)(_take_rows(o, index, batch) for o in obj)
    if isinstance(obj, dict):
        return {k: _take_rows(v, index, batch) for k, v in obj.items()}
    return _map_tensors(obj, lambda t: t.index_select(0, index.to(t.device)) if t.ndim and t.shape[0] == batch else t)


def _sample(out: Any) -> torch.Tensor:
    sample = out[0] if isinstance(out, tuple) else out.sample
    return torch.stack(sample) if isinstance(sample, list) else sample  # Z-Image: a list of equal-size rows


def _with_sample(out: Any, sample: torch.Tensor) -> Any:
    if isinstance(out[0] if isinstance(out, tuple) else out.sample, list):
        sample = list(sample.unbind(0))
    return (sample, *out[1:]) if isinstance(out, tuple) else type(out)(sample=sample)


class _PrefixHook(ModelHook):
    """On a block before the first perturbed one: run only the non-perturbed rows, copy cond rows to perturbed."""

    def __init__(self, guide: _GuidanceHook) -> None:
        super().__init__()
        self.guide = guide

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        shared = self.guide.shared
        if shared is None:
            return self.fn_ref.original_forward(*args, **kwargs)
        index, names = shared
        rows = self.guide.base_rows
        args, kwargs = _take_rows((args, kwargs), torch.arange(rows, device=index.device), len(index))
        with self.guide.handle.branches(*names[:-1]):
            out = self.fn_ref.original_forward(*args, **kwargs)
        return _take_rows(out, index, self.guide.base_rows)


class _GuidanceHook(ModelHook):
    """Around the denoiser: add the perturbed rows to the cond call and fold them into eps_c."""

    def __init__(self, handle: Installation, model: torch.nn.Module, scale: float, steps: tuple[int, int] | None,
                 cfg_scale: float | None) -> None:
        super().__init__()
        self.handle, self.model, self.scale, self.steps, self.cfg_scale = handle, model, scale, steps, cfg_scale
        self.shared: tuple[torch.Tensor, tuple[str, ...]] | None = None  # set while prefix sharing is on
        self.base_rows = 0
        self.share = False

    def guidance_weight(self, branches: tuple[str, ...]) -> float:
        """w_cfg the pipeline will apply to eps_c (0 when there is no CFG)."""
        pipe = self.handle.pipeline
        if self.cfg_scale is not None:
            return self.cfg_scale
        if "uncond" not in branches and (self.handle.family.batched_cfg or not getattr(pipe, "do_classifier_free_guidance", False)):
            return 0.0
        if pipe is None:
            raise ValueError("cfg_scale=None needs a pipeline to read its guidance scale from; pass cfg_scale")
        # Wan 2.2: transformer_2 (possibly torch.compile-wrapped) runs the low-noise steps with guidance_scale_2
        second_model = unwrap_compiled(getattr(pipe, "transformer_2", None))
        second = second_model is self.model and getattr(pipe, "_guidance_scale_2", None)
        return float(second or pipe.guidance_scale)

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        forward, state = self.fn_ref.original_forward, self.handle.state
        branches = state.batch_branches()
        in_window = self.steps is None or self.steps[0] <= state.step < self.steps[1]
        if not in_window or "cond" not in branches or "perturbed" in branches or state.auxiliary:
            return forward(*args, **kwargs)
        batch = _batch_size(module, args, kwargs)
        n = batch // len(branches)
        c0 = branches.index("cond") * n
        index = torch.cat([torch.arange(batch), torch.arange(c0, c0 + n)])
        args, kwargs = _take_rows((args, kwargs), index, batch)
        names = (*branches, "perturbed")
        self.shared, self.base_rows = ((index, names), batch) if self.share else (None, 0)
        try:
            with self.handle.branches(*names):
                out = forward(*args, **kwargs)
        finally:
            self.shared = None
        sample = _sample(out)
        eps, eps_p = sample[:batch], sample[batch:]
        eps_c = eps[c0:c0 + n]
        w_cfg = self.guidance_weight(branches)
        factor = self.scale / w_cfg if w_cfg else self.scale
        guided = torch.cat([eps[:c0], eps_c + factor * (eps_c - eps_p), eps[c0 + n:]])
        return _with_sample(out, guided)


def _batch_size(model: torch.nn.Module, args: tuple, kwargs: dict) -> int:
    latent = kwargs.get("hidden_states", kwargs.get("sample"))
    latent = latent if latent is not None else (args[0] if args else kwargs.get("x"))
    return len(latent) if isinstance(latent, list) else latent.shape[0]


def _prefix_blocks(handle: Installation, edit: SoftPAG) -> list[str]:
    """Module paths of the transformer blocks that run before the first perturbed block (forward order)."""
    blocks: list[str] = []
    for site in handle.sites:
        block = site.name.rsplit(".", 1)[0]
        if site.kind in edit.kinds and site.layer in edit.heads:
            return blocks
        if block not in blocks:
            blocks.append(block)
    return blocks


@contextmanager
def perturbed_guidance(
    pipe: Any, heads: HeadSpec, scale: float = 3.0, strength: float = 1.0, steps: tuple[int, int] | None = None,
    *, target: str = "identity", scope: str = "all", cfg_scale: float | None = None, share_prefix: bool = True,
    backend: str = "auto",
) -> Iterator[Installation]:
    """Within the block, ``pipe(...)`` runs with (Soft)PAG on ``heads``; processors and hooks are always restored.

    ``scale`` is w_pag, ``strength`` is u, ``steps=(start, stop)`` the denoising steps where the perturbed branch
    runs (outside it no extra pass is made). ``cfg_scale`` overrides the CFG weight read from the pipeline (pass
    ``true_cfg_scale`` for FLUX/HunyuanVideo true CFG). ``share_prefix`` computes the blocks before the first
    perturbed one once for cond and perturbed rows (DiT families). ``scope`` on joint attention: ``"all"`` (the
    paper's identity over [image; text]), ``"image-image"`` (diffusers' SD3 PAG: equals StableDiffusion3PAGPipeline)
    or ``"image"`` (see :mod:`attnedit.core.perturbation`). Every bad argument is one ValueError naming it.

    >>> with perturbed_guidance(pipe, heads="L1H0,L1H1", scale=3.0, strength=0.5, steps=(0, 20)):  # doctest: +SKIP
    ...     image = pipe("a cat", guidance_scale=5.0).images[0]
    """
    if not _finite(scale) or scale < 0:
        raise ValueError(f"scale={scale!r} must be a finite number >= 0 (the PAG guidance weight w_pag)")
    if cfg_scale is not None and (not _finite(cfg_scale) or cfg_scale <= 0):
        raise ValueError(f"cfg_scale={cfg_scale!r} must be > 0 and finite (the CFG weight the pipeline applies), or None")
    if not isinstance(share_prefix, bool):
        raise ValueError(f"share_prefix={share_prefix!r} must be True or False")  # noqa: TRY004
    edit = soft_pag(pipe, heads, strength, target=target, scope=scope, branches=frozenset({"perturbed"}), steps=steps)
    with ExitStack() as stack:
        handle = stack.enter_context(install(pipe, edit, backend=backend))
        share = share_prefix and handle.family.share_prefix
        for model in handle.models:
            hook = _GuidanceHook(handle, model, float(scale), steps, cfg_scale)
            hook.share = share
            _register(stack, model, hook, _HOOK)
            modules = dict(model.named_modules())
            for block in _prefix_blocks(handle, edit) if share else []:
                _register(stack, modules[block], _PrefixHook(hook), _HOOK + "_prefix")
        yield handle


def _finite(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _register(stack: ExitStack, module: torch.nn.Module, hook: ModelHook, name: str) -> None:
    registry = HookRegistry.check_if_exists_or_initialize(module)
    registry.register_hook(hook, name)
    stack.callback(registry.remove_hook, name, recurse=False)
