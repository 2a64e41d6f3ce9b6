"""Model-family adapters: what the edit core must know about each diffusers architecture.

For every family an adapter says which attention modules exist (self / cross / joint), numbers them stably
(a *layer* is an index among modules of one kind, in forward order; FLUX and HunyuanVideo number double-stream
then single-stream blocks in one flat index), reads the latent token grid and the timestep from the
denoiser's inputs, and says how the pipeline lays out classifier-free-guidance branches:

=============  ==================  ===========================  =============================
family         denoiser            joint token order            CFG branches
=============  ==================  ===========================  =============================
unet           UNet2DCondition     (self and cross separate)    one batch [uncond, cond]
sd3            SD3Transformer2D    [image, text]                one batch [uncond, cond]
flux           FluxTransformer2D   [text, image]                passes: cond, then uncond
wan            WanTransformer3D    (self and cross separate)    passes: cond, then uncond
hunyuan_video  HunyuanVideo...3D   [video, text] + key padding  passes: cond, then uncond
=============  ==================  ===========================  =============================
"""

from __future__ import annotations

import inspect
import math
import re
from dataclasses import dataclass
from typing import Any

import torch


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
class Family:
    name: str
    model_class: str
    batched_cfg: bool  # True: [uncond, cond] rows in one batch; False: separate passes, cond first
    site_rules: tuple[tuple[str, str, str], ...]  # (regex on module path, kind, stream)

    def sites(self, model: torch.nn.Module) -> list[Site]:
        """Editable attention modules in forward order, numbered per kind."""
        found: list[tuple[tuple, str, str, str, int]] = []
        for name, module in model.named_modules():
            if not hasattr(module, "set_processor"):
                continue
            for pattern, kind, stream in self.site_rules:
                if re.fullmatch(pattern, name):
                    found.append((_forward_order(name, self.site_rules), name, kind, stream, module.heads))
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
        timestep = kwargs.get("timestep")
        if timestep is None:
            position = _timestep_position(model)
            timestep = args[position] if position is not None and position < len(args) else None
        return float(timestep.max()) if torch.is_tensor(timestep) else float(timestep or 0.0)

    def forward_info(self, model: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> ForwardInfo:
        bound = _signature(model).bind_partial(*args, **kwargs).arguments
        latent = bound.get("sample", bound.get("hidden_states"))
        t = self.timestep(model, args, kwargs)
        text = bound.get("encoder_hidden_states")
        text_tokens = text.shape[1] if torch.is_tensor(text) and text.ndim == 3 else 0
        return ForwardInfo(t, self.token_grid(model, latent, bound), latent.shape[0], text_tokens)

    def token_grid(self, model: torch.nn.Module, latent: torch.Tensor, bound: dict) -> tuple[int, ...]:
        config = model.config
        if self.name == "unet":
            return tuple(latent.shape[-2:])
        if self.name == "sd3":
            p = config.patch_size
            return (latent.shape[-2] // p, latent.shape[-1] // p)
        if self.name == "flux":
            ids = bound.get("img_ids")
            if ids is None:
                side = math.isqrt(latent.shape[1])
                return (side, latent.shape[1] // side)
            ids = ids if ids.ndim == 2 else ids[0]
            return (int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1)
        if self.name == "wan":
            pt, ph, pw = config.patch_size
            f, h, w = latent.shape[-3:]
            return (f // pt, h // ph, w // pw)
        if self.name == "hunyuan_video":
            p, pt = config.patch_size, config.patch_size_t
            f, h, w = latent.shape[-3:]
            return (f // pt, h // p, w // p)
        raise AssertionError(self.name)


def _forward_order(name: str, rules: tuple[tuple[str, str, str], ...]) -> tuple:
    """Sort key that puts modules in forward order: down < mid < up, double < single, then by index."""
    rank = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2, "transformer_blocks": 0, "single_transformer_blocks": 1}
    parts = name.split(".")
    return tuple((rank.get(p, 0), int(p)) if p.isdigit() else (rank.get(p, 0), 0) for p in parts)


_SIGNATURES: dict[type, inspect.Signature] = {}


def _signature(model: torch.nn.Module) -> inspect.Signature:
    cls = type(model)
    if cls not in _SIGNATURES:
        _SIGNATURES[cls] = inspect.signature(cls.forward)
        _SIGNATURES[cls] = _SIGNATURES[cls].replace(parameters=list(_SIGNATURES[cls].parameters.values())[1:])
    return _SIGNATURES[cls]


def _timestep_position(model: torch.nn.Module) -> int | None:
    names = list(_signature(model).parameters)
    return names.index("timestep") if "timestep" in names else None


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("unet", "UNet2DConditionModel", True, ((r".*\.attn1", "self", ""), (r".*\.attn2", "cross", ""))),
        Family(
            "sd3", "SD3Transformer2DModel", True,
            ((r"transformer_blocks\.\d+\.attn", "joint", ""), (r"transformer_blocks\.\d+\.attn2", "self", "")),
        ),
        Family(
            "flux", "FluxTransformer2DModel", False,
            ((r"transformer_blocks\.\d+\.attn", "joint", "double"), (r"single_transformer_blocks\.\d+\.attn", "joint", "single")),
        ),
        Family("wan", "WanTransformer3DModel", False, ((r"blocks\.\d+\.attn1", "self", ""), (r"blocks\.\d+\.attn2", "cross", ""))),
        Family(
            "hunyuan_video", "HunyuanVideoTransformer3DModel", False,
            ((r"transformer_blocks\.\d+\.attn", "joint", "double"), (r"single_transformer_blocks\.\d+\.attn", "joint", "single")),
        ),
    )
}


def detect_family(model: torch.nn.Module) -> Family:
    """The adapter for a denoiser, by its diffusers class (subclasses count; ``torch.compile(model)`` too)."""
    model = getattr(model, "_orig_mod", model)  # torch.compile's OptimizedModule wraps the model
    for cls in type(model).__mro__:
        for family in FAMILIES.values():
            if cls.__name__ == family.model_class:
                return family
    names = ", ".join(f"{f.name} ({f.model_class})" for f in FAMILIES.values())
    raise ValueError(f"{type(model).__name__} is not a denoiser attnedit supports; supported families: {names}")


def unet_grid(grid: tuple[int, int], num_tokens: int) -> tuple[int, int]:
    """Grid of a UNet level with ``num_tokens`` tokens, given the latent grid (each level halves, rounding up)."""
    h, w = grid
    while h * w > num_tokens and h > 1:
        h, w = -(-h // 2), -(-w // 2)
    if h * w != num_tokens:
        raise ValueError(f"{num_tokens} tokens do not form a downsampled grid of the {grid} latent")
    return (h, w)
