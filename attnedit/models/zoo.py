"""Tiny random-weight model zoo for tests and benchmarks.

Real checkpoints are gigabytes and cannot be downloaded in CI (or here: there is no hub access). Attention-editing
code, however, has to be exercised against the *real* diffusers classes: their attention modules, processors,
token orders, masks and pipeline loops. This module builds miniature pipelines of each supported family with
random weights (seeded, float32, CPU) from small configs, and offline tokenizers generated on the fly:

* a CLIP byte-level BPE tokenizer whose merges are learned at build time from a small English word list, so
  common words are single tokens while unknown words split into several sub-word tokens;
* a word-level tokenizer (whitespace pre-tokenizer) standing in for the T5 / UMT5 / Llama tokenizers.

``load_tiny_pipeline`` saves each pipeline once into a cache directory and loads it back through
``DiffusionPipeline.from_pretrained``, so the real loading code (``model_index.json``) is covered as well.
A full pipeline call with ``call_kwargs(family)`` takes about 0.1 s on 2 CPU cores (single-threaded torch is
as fast for models this small, and far faster when several test processes share the cores).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import os
import pathlib
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator

import diffusers
import torch
import transformers
from diffusers import (
    AutoencoderKL,
    AutoencoderKLHunyuanVideo,
    AutoencoderKLWan,
    DDIMScheduler,
    DiffusionPipeline,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    HunyuanVideoPipeline,
    HunyuanVideoTransformer3DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
    WanPipeline,
    WanTransformer3DModel,
)

from attnedit.families import MODULES
from attnedit.models.zoo_text import (
    HUNYUAN_PROMPT_TEMPLATE,
    _clip_encoder,
    _llama_encoder,
    _t5_encoder,
    clip_tokenizer,
    word_tokenizer,
)

__all__ = [
    "EXTRA_PIPELINES", "FAMILIES", "VIDEO_PIPELINES", "HUNYUAN_PROMPT_TEMPLATE", "build_pipeline", "call_kwargs", "clip_tokenizer",
    "denoiser", "load_tiny_pipeline", "save_tiny_pipeline", "word_tokenizer",
]

FAMILIES: tuple[str, ...] = ("sd15", "sdxl", "sd3", "flux", "wan", "hunyuan_video")
# Further tiny pipelines of a family above, built and loaded like them but not iterated over by FAMILIES' users:
# "wan22" is a Wan 2.2 A14B-style WanPipeline with two denoisers (transformer, transformer_2) and boundary_ratio.
# The family modules' own tiny pipelines (attnedit.families.<name>.TINY: {name: {"build", "call", "video"}}) join
# them here: loaded and cached like the rest, by name.
_FAMILY_TINY: dict[str, dict] = {name: spec for module in MODULES for name, spec in getattr(module, "TINY", {}).items()}
EXTRA_PIPELINES: tuple[str, ...] = ("wan22", *_FAMILY_TINY)
VIDEO_PIPELINES: tuple[str, ...] = ("wan", "wan22", "hunyuan_video", *(n for n, s in _FAMILY_TINY.items() if s.get("video")))



def _image_vae(latent_channels: int, **kwargs) -> AutoencoderKL:
    """4-level AutoencoderKL (vae_scale_factor 8) with 8 channels everywhere."""
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=(8, 8, 8, 8),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1, norm_num_groups=4, sample_size=64, **kwargs,
    )


# ------------------------------------------------------------------------------------------- builders
def _build_sd15() -> StableDiffusionPipeline:
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=2, norm_num_groups=8,
    )
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(
        vae=_image_vae(4, scaling_factor=0.18215), text_encoder=_clip_encoder(32), tokenizer=clip_tokenizer(),
        unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def _build_sdxl() -> StableDiffusionXLPipeline:
    time_dim, pooled_dim = 8, 32  # add_embedding input = 6 micro-conditioning ids * time_dim + pooled text embeds
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn", transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(2, 2, 4), use_linear_projection=True, norm_num_groups=8,
        cross_attention_dim=32 + 32,  # text_encoder hidden + text_encoder_2 hidden (concatenated)
        addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + pooled_dim,
    )
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       timestep_spacing="leading", steps_offset=1)
    return StableDiffusionXLPipeline(
        vae=_image_vae(4, scaling_factor=0.13025), text_encoder=_clip_encoder(32),
        text_encoder_2=_clip_encoder(32, projection=pooled_dim), tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(), unet=unet, scheduler=scheduler,
    )


def _build_sd3() -> StableDiffusion3Pipeline:
    clip_hidden, clip_proj, t5_dim = 32, 16, 64
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, caption_projection_dim=32,  # = heads * head_dim
        joint_attention_dim=t5_dim,  # = T5 d_model; the two CLIP hidden states are concatenated (2 x clip_hidden,
        # must be <= t5_dim) and zero-padded to it
        pooled_projection_dim=2 * clip_proj,  # both CLIP text_embeds, concatenated
        pos_embed_max_size=16,  # >= latent side / patch_size
    )
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_image_vae(16, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609,
                       scaling_factor=1.5035),
        text_encoder=_clip_encoder(clip_hidden, projection=clip_proj), tokenizer=clip_tokenizer(),
        text_encoder_2=_clip_encoder(clip_hidden, projection=clip_proj), tokenizer_2=clip_tokenizer(),
        text_encoder_3=_t5_encoder(t5_dim), tokenizer_3=word_tokenizer("t5"),
    )


def _build_flux() -> FluxPipeline:
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16 * 4,  # 2x2-packed VAE latents
        num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32,  # = T5 d_model
        pooled_projection_dim=32,  # = CLIP hidden (pooler output)
        guidance_embeds=True, axes_dims_rope=[4, 4, 8],  # sums to attention_head_dim
    )
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    return FluxPipeline(
        transformer=transformer, scheduler=scheduler,
        vae=_image_vae(16, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.1159,
                       scaling_factor=0.3611),
        text_encoder=_clip_encoder(32), tokenizer=clip_tokenizer(),
        text_encoder_2=_t5_encoder(32), tokenizer_2=word_tokenizer("t5"),
    )


def _wan_transformer() -> WanTransformer3DModel:
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=32,  # = UMT5 d_model
        freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )


def _build_wan() -> WanPipeline:
    transformer = _wan_transformer()
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    return WanPipeline(
        transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        text_encoder=_t5_encoder(32, umt5=True), tokenizer=word_tokenizer("t5"),
    )


def _build_wan22() -> WanPipeline:
    """Wan 2.2 A14B layout: ``transformer`` for the high-noise steps (t >= 0.875 * 1000), ``transformer_2`` after.

    The first three components are drawn exactly as in ``_build_wan``; ``transformer_2`` has the same config and
    its own seed (``initial seed + 1``), so the two denoisers differ.
    """
    pipe = _build_wan()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(torch.initial_seed() + 1)
        transformer_2 = _wan_transformer()
    return WanPipeline(
        transformer=pipe.transformer, transformer_2=transformer_2, boundary_ratio=0.875, vae=pipe.vae,
        scheduler=pipe.scheduler, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
    )


def _build_hunyuan_video() -> HunyuanVideoPipeline:
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=16,  # = Llama hidden
        pooled_projection_dim=32,  # = CLIP hidden (pooler output)
        rope_axes_dim=(2, 4, 4),  # sums to attention_head_dim
    )
    vae = AutoencoderKLHunyuanVideo(
        in_channels=3, out_channels=3, latent_channels=4, down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        act_fn="silu", norm_num_groups=4, scaling_factor=0.476986, spatial_compression_ratio=8,
        temporal_compression_ratio=4, mid_block_add_attention=True,
    )
    return HunyuanVideoPipeline(
        transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        text_encoder=_llama_encoder(16), tokenizer=word_tokenizer("llama"),
        text_encoder_2=_clip_encoder(32), tokenizer_2=clip_tokenizer(),
    )


_BUILDERS: dict[str, Callable[[], DiffusionPipeline]] = {
    "sd15": _build_sd15, "sdxl": _build_sdxl, "sd3": _build_sd3,
    "flux": _build_flux, "wan": _build_wan, "hunyuan_video": _build_hunyuan_video, "wan22": _build_wan22,
}

_PROMPT = "a red cat sitting on a blue square"
_CALL_KWARGS: dict[str, dict] = {
    "sd15": {"height": 64, "width": 64, "guidance_scale": 7.5},
    "sdxl": {"height": 64, "width": 64, "guidance_scale": 5.0},
    "sd3": {"height": 64, "width": 64, "guidance_scale": 5.0, "max_sequence_length": 32},
    # FLUX and HunyuanVideo guidance is embedded (guidance-distilled): one branch, no [uncond, cond] batch.
    "flux": {"height": 64, "width": 64, "guidance_scale": 3.5, "max_sequence_length": 32},
    "wan": {"height": 32, "width": 32, "num_frames": 5, "guidance_scale": 5.0, "max_sequence_length": 32},
    "hunyuan_video": {
        "height": 32, "width": 32, "num_frames": 5, "guidance_scale": 6.0, "max_sequence_length": 32,
        "prompt_template": HUNYUAN_PROMPT_TEMPLATE,
    },
    # 2 steps at shift 7: t = 1000 (transformer), then t = 46.8 (< 875: transformer_2)
    "wan22": {"height": 32, "width": 32, "num_frames": 5, "guidance_scale": 5.0, "guidance_scale_2": 3.0,
              "max_sequence_length": 32},
}
_BUILDERS.update({name: spec["build"] for name, spec in _FAMILY_TINY.items()})
_CALL_KWARGS.update({name: spec.get("call", {}) for name, spec in _FAMILY_TINY.items()})


# ------------------------------------------------------------------------------------------ public API
def _check_family(family: str) -> None:
    if family not in FAMILIES + EXTRA_PIPELINES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES + EXTRA_PIPELINES}")


def build_pipeline(family: str, seed: int = 0) -> DiffusionPipeline:
    """Build a tiny random-weight pipeline of ``family`` (float32, CPU), weights drawn under ``manual_seed(seed)``."""
    _check_family(family)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipe = _BUILDERS[family]()
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()  # freshly constructed modules are in training mode; from_pretrained ones are not
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_pipeline(family: str, directory: str | os.PathLike, seed: int = 0) -> pathlib.Path:
    """Build ``family`` and ``save_pretrained`` it (safetensors) into ``directory/family``; return that path."""
    path = pathlib.Path(directory) / family
    with quiet_progress_bars():
        build_pipeline(family, seed).save_pretrained(path, safe_serialization=True)
    return path


@contextlib.contextmanager
def quiet_progress_bars() -> Iterator[None]:
    """Silence diffusers' and transformers' save/load progress bars, restoring their previous state."""
    libs = [diffusers.utils.logging, transformers.utils.logging]
    enabled = [lib.is_progress_bar_enabled() for lib in libs]
    for lib in libs:
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, was_enabled in zip(libs, enabled):
            if was_enabled:
                lib.enable_progress_bar()


def _cache_root(cache_dir: str | os.PathLike | None) -> pathlib.Path:
    if cache_dir is None:
        cache_dir = os.environ.get("ATTNEDIT_ZOO_DIR") or pathlib.Path.home() / ".cache" / "attnedit" / "zoo"
    return pathlib.Path(cache_dir)


@functools.lru_cache(maxsize=1)
def _cache_key() -> str:
    """Changes whenever the zoo's files or the library versions change, so stale tiny checkpoints are never reused."""
    digest = hashlib.sha256(pathlib.Path(__file__).read_bytes())
    digest.update(pathlib.Path(__file__).with_name("zoo_text.py").read_bytes())
    for module in MODULES:  # the family modules' own tiny builders (TINY)
        if getattr(module, "TINY", None):
            digest.update(pathlib.Path(module.__file__).read_bytes())
    digest.update(f"{diffusers.__version__}/{transformers.__version__}/{torch.__version__}".encode())
    return digest.hexdigest()[:12]


def load_tiny_pipeline(family: str, cache_dir: str | os.PathLike | None = None, seed: int = 0) -> DiffusionPipeline:
    """Load ``family`` with ``DiffusionPipeline.from_pretrained``, saving it into the cache first if missing.

    The cache lives in ``cache_dir``, else ``$ATTNEDIT_ZOO_DIR``, else ``~/.cache/attnedit/zoo``, under
    ``<key>-seed<seed>/<family>``. Saving goes through a temporary directory and an atomic rename, so concurrent
    processes never see a half-written pipeline; whoever renames first wins and the others reuse its copy.
    """
    _check_family(family)
    with _LOAD_LOCK:  # diffusers' empty-weight loading and the seeded build patch global state: one thread at a time
        return _load_tiny_pipeline(family, cache_dir, seed)


_LOAD_LOCK = threading.RLock()


def _load_tiny_pipeline(family: str, cache_dir: str | os.PathLike | None, seed: int) -> DiffusionPipeline:
    parent = _cache_root(cache_dir) / f"{_cache_key()}-seed{seed}"
    target = parent / family
    if not (target / "model_index.json").is_file():
        parent.mkdir(parents=True, exist_ok=True)
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{family}-", dir=parent))
        try:
            try:
                os.rename(save_tiny_pipeline(family, tmp, seed), target)
            except OSError:
                if not (target / "model_index.json").is_file():  # lost the race only if the winner is complete
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    with quiet_progress_bars():
        pipe = DiffusionPipeline.from_pretrained(target)
    with torch.no_grad():  # copy out of the (unaligned) safetensors mmap: same BLAS kernels, same numbers as built
        for component in pipe.components.values():
            if isinstance(component, torch.nn.Module):
                for tensor in [*component.parameters(), *component.buffers()]:
                    tensor.data = tensor.data.clone()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def call_kwargs(family: str) -> dict:
    """Default kwargs for a fast full call (add ``generator=...``): 2 steps, CFG on where supported, numpy output."""
    _check_family(family)
    return {"prompt": _PROMPT, "num_inference_steps": 2, "output_type": "np", **copy.deepcopy(_CALL_KWARGS[family])}


def denoiser(pipe: DiffusionPipeline) -> torch.nn.Module:
    """The denoising network of ``pipe``: its ``unet`` or its ``transformer``."""
    model = getattr(pipe, "unet", None)
    if model is None:
        model = getattr(pipe, "transformer", None)
    if model is None:
        raise ValueError(f"{type(pipe).__name__} has neither a unet nor a transformer")
    return model
