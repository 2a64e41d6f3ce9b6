"""One video on several GPUs: diffusers' Ulysses context parallelism for Wan and HunyuanVideo, with attnedit's edits.

``enable_ulysses(pipe, N)`` calls diffusers' ``enable_parallelism(config=ContextParallelConfig(ulysses_degree=N))``
on the pipeline's denoiser(s) with the split plan its family declares (``Family.context_parallel``: the model's own
``_cp_plan``, or the family's plan plus :class:`TextMaskShardHook` where text is split too, as in HunyuanVideo). The edit processors then run their
edits inside diffusers' all-to-all (:mod:`attnedit.processors.ulysses`). Launch one process per GPU::

    torchrun --nproc_per_node 4 -m attnedit video "a fox in snow" --model Wan-AI/Wan2.1-T2V-1.3B-Diffusers --ulysses 4

Counts that the degree cannot split (heads at set-up; video or text tokens at each call) raise one ValueError
before any collective runs, on every rank alike.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any

import torch
import torch.distributed as dist
import attnedit.core.versions  # noqa: F401  (a clear error on an untested diffusers, before its internals)
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.context_parallel import ModuleForwardMetadata
from diffusers.models._modeling_parallel import ContextParallelConfig, ContextParallelInput, ContextParallelOutput

from attnedit.core.families import patch_grid
from attnedit.families import detect_family
from attnedit.core.install import _denoisers

_MASK_HOOK = "attnedit_cp_text_mask"


class TextMaskShardHook(ModelHook):
    """Give a HunyuanVideo block this rank's part of the ``[video; text]`` key padding mask: ``[video_r; text_r]``.

    The model builds one mask ``(B, 1, 1, V + T)`` (False on padded text keys) and passes it to every block. A rank
    holds video tokens ``[r V/N, (r+1) V/N)`` and text tokens ``[r T/N, (r+1) T/N)``, so its mask is those two
    pieces. diffusers' Ulysses attention all-gathers the local masks in the same layout as the keys it gathers, so
    the stock processor and attnedit's edits both mask exactly the padded text keys.
    """

    def __init__(self, config: ContextParallelConfig) -> None:
        super().__init__()
        self.config = config
        self.metadata: ModuleForwardMetadata | None = None

    def initialize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        self.metadata = ModuleForwardMetadata(_cls=type(module))
        return module

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any):
        args = list(args)
        mask, is_kwarg, index = self.metadata._get_parameter_from_args_kwargs("attention_mask", args, kwargs)
        if mask is None:
            return tuple(args), kwargs
        video = self.metadata._get_parameter_from_args_kwargs("hidden_states", args, kwargs)[0].shape[1]
        text = self.metadata._get_parameter_from_args_kwargs("encoder_hidden_states", args, kwargs)[0].shape[1]
        mask = shard_text_mask(mask, video, text, self.config.ulysses_degree,
                               dist.get_rank(self.config._flattened_mesh.get_group()))
        if is_kwarg:
            kwargs["attention_mask"] = mask
        else:
            args[index] = mask
        return tuple(args), kwargs


def shard_text_mask(mask: torch.Tensor, video: int, text: int, world: int, rank: int) -> torch.Tensor:
    """Rank ``rank``'s ``[video_r; text_r]`` part of a global ``(..., V + T)`` mask; ``video``/``text`` are the block's
    token counts, global (hooks that run before the plan's split) or local (after it)."""
    total = mask.shape[-1]
    if total == video + text:  # this block's inputs are not split yet
        video, text = video // world, text // world
    elif total != world * (video + text):
        raise ValueError(f"a key mask over {total} tokens matches neither {video} + {text} tokens nor {world} shards of them")
    global_video = video * world
    return torch.cat([mask[..., rank * video:(rank + 1) * video],
                      mask[..., global_video + rank * text:global_video + (rank + 1) * text]], dim=-1)


def init_distributed(device: str | None = None) -> str:
    """Join the process group of a ``torchrun`` / ``accelerate launch`` run (NCCL on CUDA, else gloo) and return
    this rank's device (``cuda:<LOCAL_RANK>``, or ``device``, or cpu)."""
    if "WORLD_SIZE" not in os.environ and not dist.is_initialized():
        raise ValueError("context parallelism needs one process per GPU: launch with torchrun --nproc_per_node N "
                         "(or accelerate launch --num_processes N)")
    cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    if cuda:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return device or "cpu"


def check_heads(model: torch.nn.Module, degree: int) -> None:
    """ValueError unless Ulysses degree ``degree`` divides the model's attention heads (each rank computes H/N)."""
    declared = detect_family(model)
    family, split = declared.name, declared.context_parallel
    if split is None:
        from attnedit.families import FAMILIES

        known = [f.name for f in FAMILIES.values() if f.context_parallel is not None]
        raise ValueError(f"context parallelism with attnedit supports {', '.join(known)}; got {family}")
    if not isinstance(degree, int) or degree < 2:
        raise ValueError(f"ulysses degree={degree!r} must be an integer >= 2")
    heads = model.config.num_attention_heads
    if heads % degree:
        raise ValueError(f"{family} has {heads} attention heads, which Ulysses degree {degree} cannot split evenly; "
                         f"use a degree that divides {heads}")
    reason = split.refuse(model) if split.refuse is not None else None
    if reason:
        raise ValueError(reason)


def check_tokens(model: torch.nn.Module, degree: int, args: tuple, kwargs: dict) -> None:
    """ValueError when one forward's video (or HunyuanVideo text) tokens do not split evenly over ``degree`` ranks."""
    declared = detect_family(model)
    family = declared.name
    latent = kwargs.get("hidden_states", args[0] if args else None)
    grid = patch_grid(model, latent, {})
    if math.prod(grid) % degree:
        raise ValueError(
            f"{family}: {math.prod(grid)} video tokens ({grid[0]} latent frames x {grid[1]} x {grid[2]}) cannot be "
            f"split evenly over Ulysses degree {degree}; choose num_frames, height and width so that the token count "
            f"is a multiple of {degree}"
        )
    text = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
    if declared.context_parallel.split_text and text is not None and text.shape[1] % degree:
        raise ValueError(f"{family}: {text.shape[1]} text tokens cannot be split evenly over Ulysses degree "
                         f"{degree}; set max_sequence_length to a multiple of {degree}")


def _resolve_on_cpu(model: torch.nn.Module, config: Any) -> Any:
    """diffusers 0.42's ``ModelMixin._resolve_parallel_config`` for machines without an accelerator.

    The original picks ``rank % torch.accelerator.device_count()``, which is a ZeroDivisionError on a CPU-only
    machine (gloo), and a CUDA device mesh. This builds the same ``ParallelConfig`` on a CPU mesh.
    """
    from diffusers.models._modeling_parallel import ParallelConfig

    if isinstance(config, ContextParallelConfig):
        config = ParallelConfig(context_parallel_config=config)
    cp = config.context_parallel_config
    from torch.distributed.device_mesh import init_device_mesh

    mesh = cp.mesh or init_device_mesh("cpu", cp.mesh_shape, mesh_dim_names=cp.mesh_dim_names)
    config.setup(dist.get_rank(), dist.get_world_size(), torch.device("cpu"), mesh=mesh)
    model._parallel_config = config
    return config


def _check_forward(degree: int):
    def hook(model: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        check_tokens(model, degree, args, kwargs)

    return hook


def enable_ulysses(target: Any, degree: int | ContextParallelConfig) -> int:
    """Enable diffusers' Ulysses context parallelism of ``degree`` ranks on a Wan / HunyuanVideo pipeline or denoiser.

    Idempotent for the same degree (parallelism stays on: diffusers cannot turn it off). Call it before or after
    ``install(...)``; the processors read the config at every call. Returns the degree.
    """
    config = degree if isinstance(degree, ContextParallelConfig) else None
    degree = config.ulysses_degree if config is not None else degree
    if config is not None and (config.ring_degree > 1 or config.ulysses_anything):
        raise ValueError("attnedit supports ContextParallelConfig(ulysses_degree=N) only (no ring, no ulysses_anything)")
    models = _denoisers(target)
    for model in models:
        check_heads(model, degree)
    if not dist.is_initialized():
        raise ValueError("context parallelism needs torch.distributed: launch with torchrun --nproc_per_node "
                         f"{degree} and call attnedit.core.parallel.init_distributed() first")
    if dist.get_world_size() != degree:
        raise ValueError(f"Ulysses degree {degree} needs {degree} processes; this run has {dist.get_world_size()} "
                         f"(torchrun --nproc_per_node {degree})")
    for model in models:
        present = model._parallel_config
        if present is not None:
            cp = present.context_parallel_config
            if cp is None or cp.ulysses_degree != degree:
                raise ValueError(f"{type(model).__name__} already runs another parallelism ({present}); "
                                 "diffusers cannot change it: load the model again")
            continue
        split = detect_family(model).context_parallel
        plan = split.plan
        if torch.accelerator.device_count() == 0:
            model._resolve_parallel_config = functools.partial(_resolve_on_cpu, model)
        try:
            model.enable_parallelism(config=config or ContextParallelConfig(ulysses_degree=degree), cp_plan=plan)
        finally:
            model.__dict__.pop("_resolve_parallel_config", None)
        if split.split_text:
            cp = model._parallel_config.context_parallel_config
            for block in [*model.transformer_blocks, *model.single_transformer_blocks]:
                HookRegistry.check_if_exists_or_initialize(block).register_hook(TextMaskShardHook(cp), _MASK_HOOK)
        model.register_forward_pre_hook(_check_forward(degree), with_kwargs=True)
    return degree


def ring_pairs(blocks: torch.Tensor, world: int) -> torch.Tensor:
    """Bool ``(world, world)``: which (query chunk, key/value chunk) pairs of a block mask keep any block.

    Under ring attention rank q computes its queries against chunk kv at step ``(kv - q) % world``; a False entry is
    a step that could be skipped (see the README, "One video on several GPUs").
    """
    nq, nk = blocks.shape
    rows = torch.tensor_split(torch.arange(nq), world)
    cols = torch.tensor_split(torch.arange(nk), world)
    return torch.tensor([[bool(blocks[r][:, c].any()) for c in cols] for r in rows])
