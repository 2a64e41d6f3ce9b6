"""Published architectures: the denoiser configs of the checkpoints users load, buildable without weights.

Each :class:`Architecture` holds the ``config.json`` of a real checkpoint's denoiser (copied into
``attnedit/models/configs/``; no download) and can build it three ways:

* ``build("full", device="meta")``: every layer at the published size on the meta device (no memory), to check
  that the family adapters find and number the real model's attention sites;
* ``build("reduced")``: every width, head count, head dim and norm as published but 1-2 blocks of each kind,
  random weights on the CPU, small enough to run one forward at a small latent size;
* ``inputs(model, ...)``: denoiser keyword arguments at a small latent size, with the real text widths (and the
  real 512-token text of Wan, HunyuanVideo's padded text mask, FLUX's packed latents and ids).

``expected_sites`` writes out, from the config alone, which attention modules the real model has and how
attnedit numbers them (kind, layer, heads, stream), independently of the adapter code it checks.
"""

from __future__ import annotations

import functools
import json
import pathlib
from dataclasses import dataclass, field
from typing import Any

import torch

from attnedit.families import MODULES, family_module

__all__ = ["ARCHITECTURES", "Architecture", "ExpectedSite", "get_architecture"]

_CONFIGS = pathlib.Path(__file__).with_name("configs")


@dataclass(frozen=True)
class ExpectedSite:
    name: str
    kind: str
    layer: int
    heads: int
    stream: str = ""


@dataclass(frozen=True)
class Architecture:
    """One published checkpoint's denoiser (and what its pipeline adds, e.g. Wan 2.2's second transformer)."""

    name: str  # file stem in attnedit/configs
    hub_id: str
    family: str  # attnedit family adapter
    pipeline: str  # diffusers pipeline class of the checkpoint
    reduced: dict[str, Any]  # config overrides for reduced depth (widths untouched)
    denoisers: tuple[str, ...] = ("transformer",)  # pipeline attributes holding a copy of this config
    pipeline_config: dict[str, Any] = field(default_factory=dict)  # model_index.json entries that matter here

    @functools.cached_property
    def config(self) -> dict[str, Any]:
        """The published config (``_class_name`` and version keys removed)."""
        raw = json.loads((_CONFIGS / f"{self.name}.json").read_text())
        return {k: v for k, v in raw.items() if not k.startswith("_")}

    @property
    def model_class(self) -> str:
        return json.loads((_CONFIGS / f"{self.name}.json").read_text())["_class_name"]

    def build(self, depth: str = "reduced", device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
              seed: int = 0) -> torch.nn.Module:
        """The denoiser at ``depth`` ``"full"`` (use ``device="meta"``) or ``"reduced"``, random weights, eval mode."""
        if depth not in ("full", "reduced"):
            raise ValueError(f"depth={depth!r} must be 'full' or 'reduced'")
        import diffusers

        config = {**self.config, **(self.reduced if depth == "reduced" else {})}
        cls = getattr(diffusers, self.model_class)
        with torch.random.fork_rng(devices=[]), torch.device(device):
            torch.manual_seed(seed)
            model = cls.from_config(config)  # from_config: published keys the class no longer takes are ignored
        return (model if dtype == torch.float32 else model.to(dtype)).eval()

    # -- what the real model has -----------------------------------------------------------------------------
    def expected_sites(self, depth: str = "full") -> list[ExpectedSite]:
        """Attention sites of the model built at ``depth``, in forward order, numbered per kind."""
        config = {**self.config, **(self.reduced if depth == "reduced" else {})}
        raw = family_module(self.family).published_sites(config)
        counts: dict[str, int] = {}
        sites = []
        for name, kind, heads, stream in raw:
            sites.append(ExpectedSite(name, kind, counts.get(kind, 0), heads, stream))
            counts[kind] = counts.get(kind, 0) + 1
        return sites

    # -- inputs for one forward ------------------------------------------------------------------------------
    def inputs(self, model: torch.nn.Module, batch: int = 1, size: tuple[int, ...] | None = None, text: int = 16,
               seed: int = 0) -> dict[str, Any]:
        """Keyword arguments for ``model(**inputs)``: latents of ``size`` (latent units: (h, w) or (f, h, w))."""
        g = torch.Generator().manual_seed(seed)
        dtype = next(model.parameters()).dtype

        def rand(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=g).to(dtype)

        t = torch.full((batch,), 500.0)
        return family_module(self.family).example_inputs(self, model, batch, size, text, rand, t)


ARCHITECTURES: dict[str, Architecture] = {
    spec["name"]: Architecture(family=module.FAMILY.name, **spec)
    for module in MODULES for spec in getattr(module, "PUBLISHED", ())
}


def get_architecture(name: str) -> Architecture:
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[name]


def meta_denoiser(model: str) -> torch.nn.Module:
    """The denoiser of ``model`` at full size on the meta device, reading configs only (no weights).

    ``model`` is an architecture name or its hub id (the shipped config: offline), or any other hub id or
    diffusers folder (its ``model_index.json`` and denoiser ``config.json`` are read).
    """
    for arch in ARCHITECTURES.values():
        if model in (arch.name, arch.hub_id):
            return arch.build("full", device="meta")
    import diffusers

    index = diffusers.DiffusionPipeline.load_config(model)
    for part in ("unet", "transformer"):
        entry = index.get(part)
        if isinstance(entry, (list, tuple)) and entry[1]:
            cls = getattr(diffusers, entry[1])
            with torch.device("meta"):
                return cls.from_config(cls.load_config(model, subfolder=part))
    raise ValueError(f"{model!r} has no unet or transformer in its model_index.json")
