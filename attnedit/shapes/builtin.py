"""The small trained models that ship with attnedit: the offline default and the ground each method is measured on.

* ``shapes-t2i``: a Stable Diffusion pipeline (UNet with cross-attention, AutoencoderKL, CLIP text encoder) trained
  on the procedural shapes world (:mod:`attnedit.shapes.world`) at 64x64 pixels, 16x16x4 latents.
* ``shapes-t2v``: a Wan pipeline (WanTransformer3DModel, AutoencoderKLWan, UMT5 encoder) trained on moving shapes,
  32x32 pixels, 9 frames.
* ``shapes-dit``: an SD3 pipeline (SD3Transformer2DModel: MM-DiT joint attention, flow matching) at 64x64 pixels
  on ``shapes-t2i``'s VAE, with two CLIP text encoders whose token features are their embeddings: a model whose
  attention, not convolutions, carries the content.

Both are ordinary diffusers folders inside the package (``attnedit/shapes/weights/<name>``, fp16 safetensors) and load
with ``DiffusionPipeline.from_pretrained``. :mod:`attnedit.shapes.training` builds them from the untrained architectures
below; ``python -m attnedit.shapes.training t2i`` reproduces a checkpoint from its seed.
"""

from __future__ import annotations

import functools
import inspect
import pathlib

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLWan,
    DDIMScheduler,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
    WanPipeline,
    WanTransformer3DModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    T5Config,
    T5EncoderModel,
    UMT5Config,
    UMT5EncoderModel,
)

from attnedit.models import zoo
from attnedit.shapes import world

MODELS_DIR = pathlib.Path(__file__).parent / "weights"  # the trained checkpoints, one folder each
BUILTIN_MODELS: dict[str, str] = {"shapes-t2i": "text-to-image", "shapes-t2v": "text-to-video",
                                  "shapes-dit": "text-to-image"}
TEXT_LENGTH = 24  # longest world caption is 17 words; BOS/EOS included
CALL_DEFAULTS: dict[str, dict] = {
    "shapes-t2i": {"height": 64, "width": 64, "num_inference_steps": 20, "guidance_scale": 4.0},
    "shapes-t2v": {"height": 32, "width": 32, "num_frames": 9, "num_inference_steps": 20, "guidance_scale": 4.0,
                   "max_sequence_length": TEXT_LENGTH},
    # its T5 was trained on 24 tokens: the pipeline's default of 256 would add 232 padding keys it never saw
    "shapes-dit": {"height": 64, "width": 64, "num_inference_steps": 20, "guidance_scale": 4.0,
                   "max_sequence_length": TEXT_LENGTH},
}

# DesignEdit on shapes-t2i: its small conv-heavy UNet rebuilds an object from the inverted noise inside the hole
# even when the object's keys are hidden, so the hole starts from fresh noise (benchmarks/effect_removal.py).
# shapes-dit: its attention carries the content, so hidden keys alone remove the object (the paper's setting, CFG 1).
# Mask growth in native (64 px) pixels: the paper's 20 px covers a third of these images and eats the neighbouring
# object; at 5 px removal takes the object and keeps the other in 12/12 sampled scenes on both models (7: 11/12
# and 12/12, 20: 8/12 and 11/12). Zoom-out and pan fill a border, which needs no growth into the kept image.
EDIT_DEFAULTS: dict[str, dict] = {
    "shapes-t2i": {"hole_noise": 1.0, "guidance_scale": 1.0, "dilation": 5, "fill_dilation": 0},
    "shapes-dit": {"hole_noise": 0.0, "guidance_scale": 1.0, "dilation": 5, "fill_dilation": 0},
}
_CALLERS: dict[type, type] = {}  # pipeline class -> its subclass whose __call__ fills in the model's call defaults


def model_path(name: str) -> pathlib.Path:
    """The folder of a built-in model; a clear error when it is unknown or was not trained."""
    if name not in BUILTIN_MODELS:
        raise ValueError(f"unknown built-in model {name!r}; valid: {sorted(BUILTIN_MODELS)}")
    path = MODELS_DIR / name
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"{path} has no model_index.json; train it with `python -m attnedit.shapes.training "
                                f"{name.removeprefix('shapes-')}`")
    return path


def load_builtin(name: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> DiffusionPipeline:
    """Load a built-in model (weights stored as fp16, computed in ``dtype``) carrying its own defaults.

    The defaults belong to the model, so every surface gets them: ``pipe.attnedit_defaults`` holds its call and
    edit settings (:class:`~attnedit.pipelines.design_edit.DesignEditor` reads the edit ones), and a bare
    ``pipe(prompt)`` uses its size, frames, steps, CFG and text length unless the call gives them.
    """
    with zoo.quiet_progress_bars():
        pipe = DiffusionPipeline.from_pretrained(model_path(name), dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    attach_defaults(pipe, CALL_DEFAULTS[name], EDIT_DEFAULTS.get(name, {}))
    return pipe.to(device)


def attach_defaults(pipe: DiffusionPipeline, call: dict, edit: dict | None = None) -> DiffusionPipeline:
    """Give ``pipe`` its model's defaults: ``call`` fills the keyword arguments a ``pipe(...)`` call leaves out,
    ``edit`` is read by DesignEdit. The class keeps its name and is a subclass of the original, so
    ``save_pretrained``, ``from_pipe`` and isinstance checks see the same pipeline.
    """
    base = type(pipe)
    if base not in _CALLERS.values():
        if base not in _CALLERS:
            _CALLERS[base] = type(base.__name__, (base,), {"__call__": _defaulted(base.__call__),
                                                           "__module__": base.__module__, "__doc__": base.__doc__})
        pipe.__class__ = _CALLERS[base]
    pipe.attnedit_defaults = {"call": dict(call), "edit": dict(edit or {})}
    return pipe


def _defaulted(call):
    """``call`` with the pipe's ``attnedit_defaults["call"]`` for the keyword arguments not given."""
    names = list(inspect.signature(call).parameters)[1:]  # after self

    @functools.wraps(call)
    def __call__(self, *args, **kwargs):
        given = set(names[:len(args)]) | set(kwargs)
        defaults = getattr(self, "attnedit_defaults", {}).get("call", {})
        return call(self, *args, **{k: v for k, v in defaults.items() if k not in given and k in names}, **kwargs)

    return __call__


def builtin_name(pipe: DiffusionPipeline) -> str | None:
    """Which built-in model ``pipe`` was loaded from, if any."""
    source = pathlib.Path(str(getattr(getattr(pipe, "config", None), "_name_or_path", "") or ""))
    return source.name if source.parent == MODELS_DIR and source.name in BUILTIN_MODELS else None



def model_defaults(pipe: DiffusionPipeline, kind: str) -> dict:
    """The ``kind`` ("call" or "edit") defaults ``pipe`` carries (:func:`attach_defaults`), else those of the
    built-in it was loaded from with ``from_pretrained``, else {}."""
    attached = getattr(pipe, "attnedit_defaults", None)
    if attached is not None:
        return dict(attached.get(kind, {}))
    name = builtin_name(pipe) or ""
    return dict((CALL_DEFAULTS if kind == "call" else EDIT_DEFAULTS).get(name, {}))


def call_options(pipe: DiffusionPipeline) -> dict:
    """Options a built-in model needs on every call whatever the size asked (shapes-t2v: its text length)."""
    defaults = model_defaults(pipe, "call")
    return {k: defaults[k] for k in ("max_sequence_length",) if k in defaults}


def edit_options(pipe: DiffusionPipeline) -> dict:
    """DesignEdit settings of the model (shapes-t2i: fresh noise in the hole; both: 5 px mask growth)."""
    return model_defaults(pipe, "edit")


# ------------------------------------------------------------------------------------------ architectures
def t2i_components() -> dict[str, torch.nn.Module]:
    """Untrained parts of ``shapes-t2i`` (draw weights under ``torch.manual_seed`` to reproduce them).

    The CLIP text encoder has no transformer layers (token + position embeddings, final layer norm): each word's
    meaning stays at its own token, so the UNet must look at a phrase's tokens where it draws that object, and its
    cross-attention maps localize as Stable Diffusion's do. With two contextual layers the trained model spread
    every word over every token and its maps were flat (in-object attention ratio 1.00), leaving nothing for
    refocusing to steer.
    """
    tokenizer = zoo.clip_tokenizer(world.WORDS, max_length=TEXT_LENGTH)
    vocab = tokenizer.get_vocab()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=0, num_attention_heads=4,
        max_position_embeddings=TEXT_LENGTH, projection_dim=64, hidden_act="gelu",
        bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
    ))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1, norm_num_groups=8, sample_size=64, scaling_factor=1.0, mid_block_add_attention=False,
    )
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64, attention_head_dim=8, norm_num_groups=16,
    )
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return {"tokenizer": tokenizer, "text_encoder": text_encoder, "vae": vae, "unet": unet, "scheduler": scheduler}


def t2i_pipeline(components: dict) -> StableDiffusionPipeline:
    return StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def dit_components(vae: AutoencoderKL | None = None) -> dict[str, torch.nn.Module]:
    """Untrained parts of ``shapes-dit``: an MM-DiT over 8x8 tokens (patch 2 on 16x16x4 latents), 6 joint blocks.

    The VAE is ``shapes-t2i``'s (trained from its own seed), with SD3's ``shift_factor`` 0. The two CLIP encoders
    have one layer each: SD3 reads the penultimate hidden state, i.e. the token + position embeddings, so each word
    stays at its token (as in ``shapes-t2i``); the layer only shapes the pooled embedding. The "T5" has no layers
    either (embeddings + final norm, word-level tokenizer) and is called with ``max_sequence_length=24``, so the
    joint text keys are 24 CLIP then 24 T5 tokens.
    """
    tokenizer = zoo.clip_tokenizer(world.WORDS, max_length=TEXT_LENGTH)
    vocab = tokenizer.get_vocab()

    def clip() -> CLIPTextModelWithProjection:
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            max_position_embeddings=TEXT_LENGTH, projection_dim=32, hidden_act="gelu",
            bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=vocab["<|endoftext|>"],
        ))

    if vae is None:
        vae = AutoencoderKL.from_pretrained(model_path("shapes-t2i") / "vae", torch_dtype=torch.float32)
    vae.register_to_config(shift_factor=0.0)
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=6, attention_head_dim=24,
        num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=96, pooled_projection_dim=64,
        pos_embed_max_size=16,
    )
    tokenizer_3 = zoo.word_tokenizer("t5", world.WORDS)
    t5 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_3.get_vocab()), d_model=64, d_kv=16, d_ff=64, num_layers=0,
                                 num_heads=4, dropout_rate=0.0, is_encoder_decoder=False))
    return {"tokenizer": tokenizer, "text_encoder": clip(), "tokenizer_2": tokenizer, "text_encoder_2": clip(),
            "tokenizer_3": tokenizer_3, "text_encoder_3": t5, "vae": vae, "transformer": transformer,
            "scheduler": FlowMatchEulerDiscreteScheduler(shift=2.0)}


def dit_pipeline(components: dict) -> StableDiffusion3Pipeline:
    return StableDiffusion3Pipeline(**components)


def t2v_components() -> dict[str, torch.nn.Module]:
    """Untrained parts of ``shapes-t2v``: 4x spatial, 2x temporal VAE; 8x8 latent frames, one token per latent."""
    tokenizer = zoo.word_tokenizer("t5", world.WORDS)
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=len(tokenizer.get_vocab()), d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
        relative_attention_num_buckets=16, dropout_rate=0.0, feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
    ))
    vae = AutoencoderKLWan(base_dim=16, z_dim=8, dim_mult=[1, 2, 2], num_res_blocks=1,
                           temperal_downsample=[False, True], latents_mean=[0.0] * 8, latents_std=[1.0] * 8,
                           scale_factor_spatial=4, scale_factor_temporal=2)
    transformer = WanTransformer3DModel(
        patch_size=(1, 1, 1), num_attention_heads=4, attention_head_dim=24, in_channels=8, out_channels=8,
        text_dim=64, freq_dim=64, ffn_dim=192, num_layers=4, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=64,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(shift=2.0)
    return {"tokenizer": tokenizer, "text_encoder": text_encoder, "vae": vae, "transformer": transformer,
            "scheduler": scheduler}


def t2v_pipeline(components: dict) -> WanPipeline:
    return WanPipeline(**components)
