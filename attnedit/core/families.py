"""What the edit core must know about a diffusers architecture: the :class:`Family` declaration.

Each model family is one module in :mod:`attnedit.families` that declares a :class:`Family`: which attention
modules are sites and of what kind (numbered per kind in forward order), how to read the token grid and the
timestep from the denoiser's inputs, how the pipeline lays out classifier-free-guidance branches, and where the
image/video and text tokens sit in each attention call. Nothing outside the family modules compares a family's
name; code asks the declaration (``family.video``, ``family.perturbed_kind``, ...).

Two ways a family's attention reaches the edits:

* ``layout`` (most families): the stock diffusers processor stays and runs unchanged; its call to diffusers'
  ``dispatch_attention_fn`` goes through attnedit (:mod:`attnedit.processors.stock`), and ``layout`` says which
  tokens of that call are image and text. Bit-exact with stock by construction.
* ``io``: projection halves (``project`` / ``finish``) for stock processors that call SDPA or xFormers themselves
  instead of the dispatcher (UNet's ``AttnProcessor2_0``, SD3's ``JointAttnProcessor2_0``).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from attnedit.core.family_hooks import ImagePipelineHooks, VideoPipelineHooks


@dataclass(frozen=True)
class Site:
    """One attention module the core can edit."""

    name: str  # module path inside the denoiser, e.g. "transformer_blocks.3.attn"
    kind: str  # "self" | "cross" | "joint"
    layer: int  # index among the model's sites of the same kind, in forward order
    heads: int
    stream: str = ""  # "double" / "single" for two-stream families


@dataclass(frozen=True)
class ForwardInfo:
    """What one denoiser call tells the processors (set by a forward pre-hook)."""

    timestep: float
    grid: tuple[int, ...]  # token grid of the image/video tokens at the model's full token resolution
    batch: int
    text_tokens: int = 0  # length of the text sequence (needed by single-stream blocks)
    extra: Mapping[str, Any] = field(default_factory=dict)  # what a family's layout needs (e.g. reference tokens)


@dataclass
class AttentionCall:
    """Everything an edit may ask about the attention call it is acting on."""

    site: Site
    family: str
    step: int
    branches: tuple[str, ...]  # branch of each batch row
    grid: tuple[int, ...]  # token grid of this call's image/video tokens
    num_queries: int
    num_keys: int
    image_queries: slice
    image_keys: slice
    text_queries: slice | None
    text_keys: slice | None
    device: torch.device
    dtype: torch.dtype
    # global index of the call's first head: under Ulysses context parallelism a rank holds heads
    # [head_offset, head_offset + H_local) of the module (attnedit.processors.ulysses); 0 otherwise
    head_offset: int = 0


@dataclass(frozen=True)
class TokenLayout:
    """Where the edited image/video tokens and the text tokens sit in one attention call's queries and keys.

    Tokens in neither (e.g. FLUX.1 Kontext's reference-image tokens; not Wan VACE's control stream, which is on the
    video grid and edited as video) are left alone by token-level edits: key masks keep them, maps do not read them.
    """

    image_q: slice
    image_k: slice
    text_q: slice | None = None
    text_k: slice | None = None
    grid: tuple[int, ...] | None = None  # the call's grid when it differs from the forward's (UNet levels)


@dataclass
class ProcessorCall:
    """One invocation of a stock processor: its arguments by name, and how many attention calls it has made."""

    site: Site
    arguments: dict[str, Any]  # the stock processor's __call__ arguments (attn, hidden_states, ...)
    index: int = 0  # the dispatch call being made (0 for the first); processors like Wan I2V's make two

    def get(self, name: str, default: Any = None) -> Any:
        return self.arguments.get(name, default)


@dataclass(frozen=True)
class ContextParallel:
    """How a family's sequence is split under diffusers' Ulysses context parallelism (:mod:`attnedit.core.parallel`)."""

    plan: Mapping[str, Any] | None = None  # a split plan where diffusers ships none for the model (else its _cp_plan)
    # joint [video; text] calls with both parts split per rank: the text count must split too, and the key padding
    # mask is cut per block (attnedit.core.parallel.TextMaskShardHook)
    split_text: bool = False
    refuse: Callable[[torch.nn.Module], str | None] | None = None  # why this model's config cannot be split, if so


# site rules of the two-stream DiTs (FLUX.1, FLUX.2, HunyuanVideo): double-stream then single-stream joint attention
TWO_STREAM_RULES: tuple[tuple[str, str, str], ...] = (
    (r"transformer_blocks\.\d+\.attn", "joint", "double"),
    (r"single_transformer_blocks\.\d+\.attn", "joint", "single"),
)


# forward order of the module-path parts families use: down < mid < up, double stream < single stream; Wan VACE's
# control blocks all run before the main blocks
FORWARD_RANK: Mapping[str, int] = {
    "vace_blocks": -1, "down_blocks": 0, "mid_block": 1, "up_blocks": 2,
    "transformer_blocks": 0, "single_transformer_blocks": 1,
    "noise_refiner": -1,  # Z-Image: the image's refiner blocks run before the joint layers
}

LayoutFn = Callable[[ProcessorCall, "ForwardInfo | None", int, int], "TokenLayout | None"]
GridFn = Callable[[torch.nn.Module, torch.Tensor, dict], tuple[int, ...]]


@dataclass(frozen=True)
class Family:
    """A model family's declaration (one per module in :mod:`attnedit.families`)."""

    name: str
    model_class: str  # the diffusers denoiser class (subclasses count)
    batched_cfg: bool  # True: [uncond, cond] rows in one batch; False: separate passes, cond first
    site_rules: tuple[tuple[str, str, str], ...]  # (regex on module path, kind, stream)
    read_grid: GridFn | None = None  # (model, latent, bound forward args) -> token grid
    # (processor call, forward info, S_q, S_k) -> token layout of a dispatch call, or None to leave it unedited
    layout: LayoutFn | None = None
    io: Any = None  # projection halves, for stock processors that do not call the dispatcher
    perturbed_kind: str = "self"  # the attention kind PAG / SoftPAG perturb by default
    video: bool = False  # video tokens (f, h, w): radial attention and video editing apply
    text_kind: str = ""  # the kind whose calls hold text-image attention ("cross" / "joint"), "" for none
    radial_preset: Callable[[Any], str] | None = None  # video: the authors' radial preset name for a pipeline
    context_parallel: ContextParallel | None = None  # its split under Ulysses, where attnedit knows it
    latent_key: str = "hidden_states"  # the forward argument holding the latents
    extra_info: Callable[[torch.nn.Module, dict], Mapping[str, Any]] | None = None  # more ForwardInfo for layout
    aliases: tuple[str, ...] = ()  # other names users may give (CLI, presets)
    # head guidance may run the blocks before the first perturbed one once for both passes (False: UNets)
    share_prefix: bool = True
    image_pipeline: ImagePipelineHooks | None = None  # refocusing / DesignEdit drive its pipeline (family_hooks)
    video_pipeline: VideoPipelineHooks | None = None  # the video editor drives its pipeline (family_hooks)
    cfg_rows: tuple[str, ...] = ("uncond", "cond")  # batched CFG: the branch of each equal chunk of rows, in order

    def sites(self, model: torch.nn.Module) -> list[Site]:
        """Editable attention modules in forward order, numbered per kind."""
        found: list[tuple[tuple, str, str, str, int]] = []
        for name, module in model.named_modules():
            if not hasattr(module, "set_processor"):
                continue
            for pattern, kind, stream in self.site_rules:
                if re.fullmatch(pattern, name):
                    found.append((forward_order(name), name, kind, stream, module.heads))
                    break
        found.sort()
        counts: dict[str, int] = {}
        sites = []
        for _, name, kind, stream, heads in found:
            sites.append(Site(name, kind, counts.get(kind, 0), heads, stream))
            counts[kind] = counts.get(kind, 0) + 1
        return sites

    def timestep(self, model: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> float:
        """The call's timestep as a float (the largest, for per-token timesteps); cheap, runs every forward."""
        timestep = kwargs.get("timestep", kwargs.get("t"))
        if timestep is None:
            position = _timestep_position(model)
            timestep = args[position] if position is not None and position < len(args) else None
        return float(timestep.max()) if torch.is_tensor(timestep) else float(timestep or 0.0)

    def forward_info(self, model: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> ForwardInfo:
        bound = _signature(model).bind_partial(*args, **kwargs).arguments
        latent = bound.get(self.latent_key, bound.get("sample", bound.get("hidden_states")))
        t = self.timestep(model, args, kwargs)
        text = bound.get("encoder_hidden_states")
        text_tokens = text.shape[1] if torch.is_tensor(text) and text.ndim == 3 else 0
        extra = self.extra_info(model, bound) if self.extra_info is not None else {}
        batch = len(latent) if isinstance(latent, (list, tuple)) else latent.shape[0]  # Z-Image: a list of rows
        return ForwardInfo(t, self.token_grid(model, latent, bound), batch, text_tokens, extra)

    def token_grid(self, model: torch.nn.Module, latent: torch.Tensor, bound: dict) -> tuple[int, ...]:
        if self.read_grid is None:
            raise NotImplementedError(f"the {self.name} family declares no read_grid")
        return self.read_grid(model, latent, bound)


def forward_order(name: str) -> tuple:
    """Sort key that puts modules in forward order: down < mid < up, double < single, then by index."""
    parts = name.split(".")
    return tuple((FORWARD_RANK.get(p, 0), int(p)) if p.isdigit() else (FORWARD_RANK.get(p, 0), 0) for p in parts)


_SIGNATURES: dict[type, inspect.Signature] = {}


def _signature(model: torch.nn.Module) -> inspect.Signature:
    cls = type(model)
    if cls not in _SIGNATURES:
        _SIGNATURES[cls] = inspect.signature(cls.forward)
        _SIGNATURES[cls] = _SIGNATURES[cls].replace(parameters=list(_SIGNATURES[cls].parameters.values())[1:])
    return _SIGNATURES[cls]


def _timestep_position(model: torch.nn.Module) -> int | None:
    names = list(_signature(model).parameters)
    name = "timestep" if "timestep" in names else "t"  # Z-Image names it t
    return names.index(name) if name in names else None


def patch_grid(model: torch.nn.Module, latent: torch.Tensor, bound: dict) -> tuple[int, ...]:
    """Token grid of a patchified latent: ``(h, w) // patch`` for images, ``(f, h, w) // patch`` for video."""
    p = model.config.patch_size
    if latent.ndim == 5:
        pt = getattr(model.config, "patch_size_t", None)
        pt, ph, pw = (p if isinstance(p, (list, tuple)) else (pt or 1, p, p))
        f, h, w = latent.shape[-3:]
        return (f // pt, h // ph, w // pw)
    p = p if isinstance(p, (list, tuple)) else (p, p)
    return (latent.shape[-2] // p[-2], latent.shape[-1] // p[-1])
