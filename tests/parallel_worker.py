"""Runs tiny Wan / HunyuanVideo videos with attnedit edits, in one process or under torchrun (Ulysses over gloo).

    python tests/parallel_worker.py OUT                                   # one process: writes OUT.single
    python -m torch.distributed.run --nproc_per_node 2 tests/parallel_worker.py OUT   # writes OUT.rank<r>

Each file is a dict of numpy arrays (torch.save): the decoded videos of every case, the maps an AttentionRecorder
kept, and, under torchrun, the ValueError messages of inputs the degree cannot split. tests/test_parallel.py
compares the files.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch

torch.set_num_threads(1)

from attnedit import AttentionRecorder, KeyMask, install
from attnedit.methods.head_guidance import perturbed_guidance, soft_pag
from attnedit.methods.radial import RadialAttention
from attnedit.models import zoo
from attnedit.pipelines.radial import generate_radial

GEOMETRY = {  # 9 latent frames x 16 tokens: radial blocks of 16 keep 68% (wan) / 72% (hunyuan_video) of the video
    "wan": {"height": 64, "width": 64, "num_frames": 33},
    "hunyuan_video": {"height": 32, "width": 32, "num_frames": 33},
}
RADIAL = {"block_size": 16, "dense_steps": 0, "dense_layers": 0}


def call(family: str, **overrides) -> dict:
    """The pipeline kwargs of one video (the prompt included), seeded afresh."""
    kwargs = {**zoo.call_kwargs(family), **GEOMETRY[family], **overrides}
    return {**kwargs, "generator": torch.Generator("cpu").manual_seed(0)}


def stock(pipe, family: str, results: dict) -> None:
    """The video without edits, and how many tokens one attention module got (all, or this rank's shard)."""
    seen = []
    site = pipe.transformer.blocks[0].attn1 if family == "wan" else pipe.transformer.transformer_blocks[0].attn
    probe = site.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((args or [kwargs.get("hidden_states")])[0].shape[1]), with_kwargs=True)
    results[f"{family}/stock"] = pipe(**call(family)).frames
    probe.remove()
    results[f"{family}/tokens"] = seen[0]


def run_family(family: str, parallel: int | None, results: dict) -> None:
    pipe = zoo.build_pipeline(family)
    if parallel and family == "wan":  # Wan: parallel first, edits after; HunyuanVideo: enabled inside install()
        from attnedit.core.parallel import enable_ulysses

        enable_ulysses(pipe, parallel)
        stock(pipe, family, results)
    hole = torch.zeros(64, 64)
    hole[8:40, 16:48] = 1
    edits = (KeyMask(mask=hole), soft_pag(pipe, "1:1", strength=0.7))
    radial = {**RADIAL, "decay": 0.2 if family == "wan" else 0.95}
    with install(pipe, *edits):  # radial attention + key mask + SoftPAG, all in one video
        kwargs = call(family)
        results[f"{family}/edits"] = generate_radial(pipe, kwargs.pop("prompt"), radial=radial, parallel=parallel,
                                                     **kwargs).frames
    if f"{family}/stock" not in results:  # the stock processors got the parallel config back on uninstall
        stock(pipe, family, results)
    with perturbed_guidance(pipe, "1:1", scale=2.0, strength=0.5), install(pipe, edits[0], RadialAttention(**radial)):
        results[f"{family}/guidance"] = pipe(**call(family)).frames
    recorder = AttentionRecorder(layers={1}, mean_heads=False, steps=(1, 2), branches={"cond"},
                                 kinds={"self" if family == "wan" else "joint"})
    with install(pipe, recorder, RadialAttention(**radial)):
        pipe(**call(family, output_type="latent"))
    results[f"{family}/maps"] = torch.stack([m.probs for m in recorder.maps]).numpy()
    if parallel:  # Wan 9 x 3 x 3 = 81 video tokens, HunyuanVideo 17 text tokens: one ValueError, no collective
        bad = {"height": 48, "width": 48} if family == "wan" else {"max_sequence_length": 17}
        try:
            pipe(**call(family, output_type="latent", **bad))
        except ValueError as error:
            results[f"{family}/error"] = str(error)


def main(out: str) -> None:
    parallel = int(os.environ.get("WORLD_SIZE", "1"))
    if parallel > 1:
        from attnedit.core.parallel import init_distributed

        init_distributed("cpu")
    results: dict = {}
    for family in ("wan", "hunyuan_video"):
        run_family(family, parallel if parallel > 1 else None, results)
    if parallel > 1:
        import torch.distributed as dist

        torch.save(results, f"{out}.rank{dist.get_rank()}")
        dist.barrier()
        dist.destroy_process_group()
    else:
        torch.save(results, f"{out}.single")


if __name__ == "__main__":
    main(sys.argv[1])
