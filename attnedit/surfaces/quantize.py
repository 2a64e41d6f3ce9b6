"""Quantized weights and LoRAs for :func:`attnedit.surfaces.loading.load_pipeline`, through diffusers' own APIs.

``quantize`` names one backend for the denoiser(s) and the text encoders:

* ``int8``: torchao int8 weight-only (``TorchAoConfig(Int8WeightOnlyConfig())``); runs on a CPU too;
* ``fp8``: torchao float8 weight-only; CUDA with compute capability 8.9 or newer (Ada, Hopper);
* ``bnb-8bit`` / ``bnb-4bit``: bitsandbytes LLM.int8 / NF4 with double quantization; CUDA;
* a path ending in ``.gguf``: that single file is the transformer (``from_single_file`` with
  ``GGUFQuantizationConfig``); the other components come from the model as usual.

A LoRA is ``PATH_OR_ID[:SCALE]``; each is loaded with ``load_lora_weights`` under its own adapter name and all are
made active with ``set_adapters`` at their scales. Edits installed later project through the LoRA layers.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

__all__ = ["LOAD_FIELDS", "QUANTIZE", "check_quantize", "load_fields", "load_loras", "parse_lora", "quantization_config"]

QUANTIZE: tuple[str, ...] = ("int8", "fp8", "bnb-8bit", "bnb-4bit")
DENOISERS = ("transformer", "transformer_2", "unet")
LOAD_FIELDS = ("memory", "quantize", "lora", "variant")  # a batch job's fields that say how its model loads


def load_fields(spec: dict[str, Any]) -> dict[str, Any]:
    """A batch job's loading options (``memory``, ``quantize``, ``lora``: one spec or a list, ``variant``), names
    checked here; what the device can do is checked when the model loads."""
    from attnedit.surfaces.memory import parse_memory

    out = {k: spec[k] for k in LOAD_FIELDS if spec.get(k) is not None}
    for key in ("memory", "quantize", "variant"):
        if key in out and not isinstance(out[key], str):
            raise ValueError(f"{key}={out[key]!r} must be a string")
    if "memory" in out:
        parse_memory(out["memory"])
    quantize = out.get("quantize")
    if quantize and quantize != "none" and quantize not in QUANTIZE and not quantize.endswith(".gguf"):
        raise ValueError(f"quantize={quantize!r}; valid: {', '.join(QUANTIZE)} or a .gguf file")
    if "lora" in out:
        loras = [out["lora"]] if isinstance(out["lora"], str) else out["lora"]
        if not isinstance(loras, list):
            raise ValueError(f"lora={out['lora']!r} must be PATH_OR_ID[:SCALE] or a list of them")
        out["lora"] = [f"{source}:{scale}" for source, scale in map(parse_lora, loras)]
    return out


def check_quantize(quantize: str | None, device: str) -> str | None:
    """Validate ``quantize`` for ``device`` before anything loads: one ValueError naming the value and why."""
    if not quantize or quantize == "none":
        return None
    kind = device.split(":")[0]
    if quantize.endswith(".gguf"):
        if not os.path.isfile(quantize):
            raise ValueError(f"quantize={quantize!r}: no such GGUF file")
        if importlib.util.find_spec("gguf") is None:
            raise ValueError(f"quantize={quantize!r}: GGUF files need the 'gguf' package (pip install gguf)")
        return quantize
    if quantize not in QUANTIZE:
        raise ValueError(f"quantize={quantize!r}; valid: {', '.join(QUANTIZE)} or a .gguf file")
    backend = "bitsandbytes" if quantize.startswith("bnb") else "torchao"
    if backend == "bitsandbytes" and kind != "cuda":
        raise ValueError(f"quantize={quantize!r}: bitsandbytes needs a CUDA device; device={device!r} "
                         "(use quantize='int8' there)")
    if importlib.util.find_spec(backend) is None:
        raise ValueError(f"quantize={quantize!r} needs the {backend!r} package (pip install {backend})")
    if quantize == "fp8":
        import torch

        if kind != "cuda" or torch.cuda.get_device_capability(torch.device(device).index or 0) < (8, 9):
            raise ValueError(f"quantize='fp8' needs a CUDA GPU of compute capability 8.9 or newer; device={device!r}")
    return quantize


def _configs(quantize: str, dtype: Any) -> tuple[Any, Any]:
    """(diffusers config, transformers config) of one backend."""
    import diffusers
    import transformers

    if quantize.startswith("bnb"):
        kwargs = ({"load_in_8bit": True} if quantize == "bnb-8bit" else
                  {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
                   "bnb_4bit_compute_dtype": dtype})
        return diffusers.BitsAndBytesConfig(**kwargs), transformers.BitsAndBytesConfig(**kwargs)
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig

    make = Int8WeightOnlyConfig if quantize == "int8" else Float8WeightOnlyConfig
    return diffusers.TorchAoConfig(make()), transformers.TorchAoConfig(make())


def quantization_config(model: str, quantize: str | None, dtype: Any) -> Any:
    """A ``PipelineQuantizationConfig`` for ``from_pretrained``: every denoiser and text encoder of ``model``
    (read from its ``model_index.json``) quantized by ``quantize``; ``None`` for no or GGUF quantization."""
    if not quantize or quantize.endswith(".gguf"):
        return None
    from diffusers import DiffusionPipeline, PipelineQuantizationConfig

    index = DiffusionPipeline.load_config(model)
    mapping = {}
    for name, entry in index.items():
        if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1]):
            continue
        if name in DENOISERS or (name.startswith("text_encoder") and entry[0] == "transformers"):
            mapping[name] = _configs(quantize, dtype)[0 if entry[0] == "diffusers" else 1]
    if not mapping:
        raise ValueError(f"quantize={quantize!r}: {model!r} has no denoiser or text encoder to quantize")
    return PipelineQuantizationConfig(quant_mapping=mapping)


def gguf_transformer(model: str, path: str, dtype: Any) -> dict[str, Any]:
    """``{"transformer": model}`` loaded from the GGUF single file ``path`` with ``model``'s transformer config."""
    import diffusers
    from diffusers import DiffusionPipeline, GGUFQuantizationConfig

    entry = DiffusionPipeline.load_config(model).get("transformer")
    if not isinstance(entry, (list, tuple)) or not entry[1]:
        raise ValueError(f"quantize={path!r}: {model!r} has no transformer for a GGUF file to replace")
    cls = getattr(diffusers, entry[1])
    transformer = cls.from_single_file(path, quantization_config=GGUFQuantizationConfig(compute_dtype=dtype),
                                       config=model, subfolder="transformer", torch_dtype=dtype)
    return {"transformer": transformer}


def parse_lora(spec: str) -> tuple[str, float]:
    """``"PATH_OR_ID[:SCALE]"`` -> (path or hub id, scale); a trailing ``:number`` is the scale (default 1.0)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"lora={spec!r} must be PATH_OR_ID[:SCALE]")
    source, sep, scale = spec.rpartition(":")
    if sep and source:
        try:
            return source, float(scale)
        except ValueError:
            pass
    return spec, 1.0


def load_loras(pipe: Any, loras: list[tuple[str, float]]) -> Any:
    """Load each LoRA under its own adapter name and activate them all at their scales."""
    if not loras:
        return pipe
    if not hasattr(pipe, "load_lora_weights"):
        raise ValueError(f"lora={loras[0][0]!r}: {type(pipe).__name__} does not load LoRAs")
    names = []
    for index, (source, _) in enumerate(loras):
        name = f"lora{index}"
        try:
            pipe.load_lora_weights(source, adapter_name=name)
        except Exception as error:  # noqa: BLE001 (one clear error, whatever the reader raised)
            raise ValueError(f"lora={source!r}: cannot load it as a LoRA ({type(error).__name__}: "
                             f"{str(error).splitlines()[0][:300] if str(error) else ''})") from None
        names.append(name)
    pipe.set_adapters(names, adapter_weights=[scale for _, scale in loras])
    return pipe
