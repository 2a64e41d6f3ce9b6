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
            model = cls(**config)
        return (model if dtype == torch.float32 else model.to(dtype)).eval()

    # -- what the real model has -----------------------------------------------------------------------------
    def expected_sites(self, depth: str = "full") -> list[ExpectedSite]:
        """Attention sites of the model built at ``depth``, in forward order, numbered per kind."""
        config = {**self.config, **(self.reduced if depth == "reduced" else {})}
        raw = {"unet": _unet_sites, "sd3": _sd3_sites, "flux": _two_stream_sites, "wan": _wan_sites,
               "hunyuan_video": _two_stream_sites}[self.family](config)
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
        c = model.config
        rand = lambda *shape: torch.randn(*shape, generator=g).to(dtype)
        t = torch.full((batch,), 500.0)
        if self.family == "unet":
            h, w = size or (16, 16)
            out = {"sample": rand(batch, c.in_channels, h, w), "timestep": t,
                   "encoder_hidden_states": rand(batch, 77, c.cross_attention_dim)}
            if c.addition_embed_type == "text_time":
                pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
                ids = torch.tensor([[h * 8, w * 8, 0, 0, h * 8, w * 8]] * batch, dtype=dtype)
                out["added_cond_kwargs"] = {"text_embeds": rand(batch, pooled), "time_ids": ids}
            return out
        if self.family == "sd3":
            h, w = size or (8, 8)
            return {"hidden_states": rand(batch, c.in_channels, h, w), "timestep": t,
                    "encoder_hidden_states": rand(batch, text, c.joint_attention_dim),
                    "pooled_projections": rand(batch, c.pooled_projection_dim)}
        if self.family == "flux":
            h, w = size or (4, 6)  # packed-latent grid (2x2 VAE latents per token)
            ids = torch.zeros(h, w, 3)
            ids[..., 1], ids[..., 2] = torch.arange(h)[:, None], torch.arange(w)[None, :]
            out = {"hidden_states": rand(batch, h * w, c.in_channels), "timestep": t / 1000,
                   "encoder_hidden_states": rand(batch, text, c.joint_attention_dim),
                   "pooled_projections": rand(batch, c.pooled_projection_dim),
                   "img_ids": ids.reshape(-1, 3).to(dtype), "txt_ids": torch.zeros(text, 3, dtype=dtype)}
            if c.guidance_embeds:
                out["guidance"] = torch.full((batch,), 3.5)
            return out
        f, h, w = size or (4, 4, 4)
        latents = rand(batch, c.in_channels, f, h, w)
        if self.family == "wan":
            out = {"hidden_states": latents, "timestep": t, "encoder_hidden_states": rand(batch, 512, c.text_dim)}
            if self.pipeline_config.get("expand_timesteps"):  # Wan 2.2 TI2V: one timestep per token
                ph, pw = c.patch_size[1:]
                out["timestep"] = t[:, None].expand(batch, f * (h // ph) * (w // pw)).contiguous()
            if c.image_dim is not None:  # I2V: CLIP image tokens ahead of the text
                out["encoder_hidden_states_image"] = rand(batch, 257, c.image_dim)
            return out
        mask = torch.zeros(batch, text, dtype=torch.bool)
        mask[:, : text - 3] = True  # the last 3 text tokens are padding, as the pipeline pads prompts
        return {"hidden_states": latents, "timestep": t, "encoder_hidden_states": rand(batch, text, c.text_embed_dim),
                "encoder_attention_mask": mask, "pooled_projections": rand(batch, c.pooled_projection_dim),
                "guidance": torch.full((batch,), 6000.0)}


def _per_level(value: Any, levels: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] * levels


def _unet_sites(c: dict) -> list[tuple[str, str, int, str]]:
    """Transformer blocks of a UNet2DConditionModel: down, mid, up; heads = the legacy ``attention_head_dim``."""
    levels = len(c["block_out_channels"])
    heads = _per_level(c.get("num_attention_heads") or c["attention_head_dim"], levels)
    depth = _per_level(c.get("transformer_layers_per_block", 1), levels)
    layers = _per_level(c["layers_per_block"], levels)
    blocks: list[tuple[str, int, int]] = []  # (prefix, transformer layers, heads)
    for i, kind in enumerate(c["down_block_types"]):
        if kind.startswith("CrossAttn"):
            blocks += [(f"down_blocks.{i}.attentions.{a}", depth[i], heads[i]) for a in range(layers[i])]
    if c.get("mid_block_type", "UNetMidBlock2DCrossAttn") == "UNetMidBlock2DCrossAttn":
        blocks.append(("mid_block.attentions.0", depth[-1], heads[-1]))
    for i, kind in enumerate(c["up_block_types"]):
        level = levels - 1 - i
        if kind.startswith("CrossAttn"):
            blocks += [(f"up_blocks.{i}.attentions.{a}", depth[level], heads[level]) for a in range(layers[level] + 1)]
    sites = []
    for prefix, n, h in blocks:
        for t in range(n):
            sites += [(f"{prefix}.transformer_blocks.{t}.attn1", "self", h, ""),
                      (f"{prefix}.transformer_blocks.{t}.attn2", "cross", h, "")]
    return sites


def _sd3_sites(c: dict) -> list[tuple[str, str, int, str]]:
    """MM-DiT blocks: joint attention ``attn``; SD3.5's dual-attention blocks add image self-attention ``attn2``."""
    dual = set(c.get("dual_attention_layers", ()))
    sites = []
    for i in range(c["num_layers"]):
        sites.append((f"transformer_blocks.{i}.attn", "joint", c["num_attention_heads"], ""))
        if i in dual:
            sites.append((f"transformer_blocks.{i}.attn2", "self", c["num_attention_heads"], ""))
    return sites


def _two_stream_sites(c: dict) -> list[tuple[str, str, int, str]]:
    """FLUX / HunyuanVideo: double-stream then single-stream blocks, one flat joint index."""
    h = c["num_attention_heads"]
    return ([(f"transformer_blocks.{i}.attn", "joint", h, "double") for i in range(c["num_layers"])]
            + [(f"single_transformer_blocks.{i}.attn", "joint", h, "single") for i in range(c["num_single_layers"])])


def _wan_sites(c: dict) -> list[tuple[str, str, int, str]]:
    h = c["num_attention_heads"]
    return [s for i in range(c["num_layers"])
            for s in ((f"blocks.{i}.attn1", "self", h, ""), (f"blocks.{i}.attn2", "cross", h, ""))]


ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in (
    Architecture("sd15", "stable-diffusion-v1-5/stable-diffusion-v1-5", "unet", "StableDiffusionPipeline",
                 {"layers_per_block": 1}, ("unet",)),
    Architecture("sdxl-base", "stabilityai/stable-diffusion-xl-base-1.0", "unet", "StableDiffusionXLPipeline",
                 {"layers_per_block": 1, "transformer_layers_per_block": [1, 1, 1]}, ("unet",)),
    Architecture("sd3-medium", "stabilityai/stable-diffusion-3-medium-diffusers", "sd3", "StableDiffusion3Pipeline",
                 {"num_layers": 2}),
    Architecture("sd3.5-medium", "stabilityai/stable-diffusion-3.5-medium", "sd3", "StableDiffusion3Pipeline",
                 {"num_layers": 2, "dual_attention_layers": [0]}),
    Architecture("flux1-dev", "black-forest-labs/FLUX.1-dev", "flux", "FluxPipeline",
                 {"num_layers": 1, "num_single_layers": 1}),
    Architecture("wan2.1-t2v-1.3b", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "wan", "WanPipeline", {"num_layers": 2}),
    Architecture("wan2.1-i2v-14b-480p", "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers", "wan", "WanImageToVideoPipeline",
                 {"num_layers": 1}),
    Architecture("wan2.2-t2v-a14b", "Wan-AI/Wan2.2-T2V-A14B-Diffusers", "wan", "WanPipeline", {"num_layers": 1},
                 ("transformer", "transformer_2"), {"boundary_ratio": 0.875, "expand_timesteps": False}),
    Architecture("wan2.2-ti2v-5b", "Wan-AI/Wan2.2-TI2V-5B-Diffusers", "wan", "WanPipeline", {"num_layers": 1},
                 pipeline_config={"boundary_ratio": None, "expand_timesteps": True}),
    Architecture("hunyuan-video", "hunyuanvideo-community/HunyuanVideo", "hunyuan_video", "HunyuanVideoPipeline",
                 {"num_layers": 1, "num_single_layers": 1, "num_refiner_layers": 1}),
)}


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
