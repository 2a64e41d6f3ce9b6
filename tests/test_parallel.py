"""One video on several ranks: attnedit's edits under diffusers' Ulysses context parallelism.

The end-to-end test launches ``torchrun --nproc_per_node 2`` on tests/parallel_worker.py (gloo on CPU) and compares
every video with the same worker run as one plain process. The rest simulates the ranks in one process: the
all-to-all's token layout, the global call each rank's edits see, and the head mapping of SoftPAG.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from attnedit import HeadBlend, KeyMask
from attnedit.core.attention import attend
from attnedit.core.families import AttentionCall, Site
from attnedit.core.parallel import check_heads, check_tokens, enable_ulysses, ring_pairs, shard_text_mask
from attnedit.methods.radial import RadialAttention, radial_block_mask
from attnedit.processors.ulysses import (
    gathered_order,
    global_call,
    shard_attention,
    ulysses_attention,
    ulysses_config,
)

WORKER = pathlib.Path(__file__).with_name("parallel_worker.py")


def _sdpa(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _config(world: int, rank: int, **cp) -> SimpleNamespace:
    return SimpleNamespace(context_parallel_config=SimpleNamespace(
        ulysses_degree=world, _ulysses_local_rank=rank, ring_degree=cp.get("ring", 1),
        ulysses_anything=cp.get("anything", False)))


def _joint_call(video: int, text: int, heads: int, grid: tuple[int, ...]) -> AttentionCall:
    n = video + text
    return AttentionCall(
        Site("transformer_blocks.0.attn", "joint", 0, heads, "double"), "hunyuan_video", 3, ("cond",), grid, n, n,
        slice(0, video), slice(0, video), slice(video, n), slice(video, n), torch.device("cpu"), torch.float32,
    )


def _shards(x: torch.Tensor, segments: tuple[int, ...], world: int, dim: int = -1) -> list[torch.Tensor]:
    """The ranks' local sequences of a global one (as the split plans cut it): each segment split evenly, joined."""
    pieces = [p.chunk(world, dim=dim) for p in x.split(list(segments), dim=dim)]
    return [torch.cat([p[rank] for p in pieces], dim=dim) for rank in range(world)]


# --------------------------------------------------------------------------------------------- token layout
@pytest.mark.parametrize(("segments", "world"), [((12,), 2), ((8, 4), 2), ((9, 6), 3), ((8, 4), 4)])
def test_gathered_order_restores_the_global_sequence(segments, world):
    tokens = torch.arange(sum(segments))
    gathered = torch.cat(_shards(tokens, segments, world))  # what the all-to-all concatenates
    order = gathered_order(tuple(s // world for s in segments), world)
    assert torch.equal(gathered if order is None else gathered[order], tokens)


def test_global_call_scales_the_layout_and_offsets_the_heads():
    local = _joint_call(video=6, text=2, heads=4, grid=(3, 2, 2))
    seen = global_call(local, _config(world=2, rank=1))
    assert (seen.num_queries, seen.num_keys) == (16, 16)
    assert (seen.image_queries, seen.text_keys) == (slice(0, 12), slice(12, 16))
    assert seen.head_offset == 2 and seen.grid == (3, 2, 2)


def test_which_calls_are_sharded_and_which_configs_edits_refuse():
    from attnedit.families import FAMILIES

    wan, flux = FAMILIES["wan"], FAMILIES["flux"]
    config = _config(2, 0)
    assert ulysses_config(config, Site("a", "self", 0, 2), wan) is config
    assert ulysses_config(config, Site("b", "cross", 0, 2), wan) is None  # text keys stay whole on every rank
    assert ulysses_config(None, Site("a", "self", 0, 2), wan) is None
    with pytest.raises(ValueError, match="families that declare their sharded layout .*; got flux"):
        ulysses_config(config, Site("c", "joint", 0, 2), flux)
    q = torch.zeros(1, 2, 4, 8)
    call = _joint_call(4, 0, 2, (1, 2, 2))
    for config in (_config(1, 0, ring=2), _config(2, 0, anything=True)):  # edits need H/N heads, all tokens
        with pytest.raises(ValueError, match="Ulysses context parallelism with equal splits only"):
            ulysses_attention(config, q, q, q, None, call, call, [], (_sdpa, _sdpa), "sdpa")


# ---------------------------------------------------------------- the ranks of one attention call, simulated
@pytest.mark.parametrize("scope", ["all", "image-image"])
@pytest.mark.parametrize("world", [2, 4])
def test_simulated_ranks_match_one_process_with_radial_key_mask_and_softpag(world, scope):
    """HunyuanVideo-like joint call: 8 frames x 8 video tokens, then 8 text tokens of which 3 are padding."""
    torch.manual_seed(0)
    frames, per_frame, text, heads = 8, 8, 8, 4
    video = frames * per_frame
    q, k, v = (torch.randn(2, heads, video + text, 6) for _ in range(3))
    padding = torch.ones(2, 1, 1, video + text, dtype=torch.bool)
    padding[..., -3:] = False
    hidden = torch.zeros(4, 8)
    hidden[:2, :3] = 1
    edits = [RadialAttention(decay=0.5, block_size=8), KeyMask(mask=hidden), HeadBlend(strength=0.6, heads={0: (1, 3)}, scope=scope)]
    call = _joint_call(video, text, heads, (frames, 2, 4))
    reference = attend(q, k, v, padding, call, edits, _sdpa)
    assert edits[0].block_mask(call).density < 0.9  # the radial mask is not trivially dense here

    segments = (video // world, text // world)
    local_qkv = [_shards(x, (video, text), world, dim=2) for x in (q, k, v)]  # each rank projects these
    local_masks = _shards(padding, (video, text), world)
    per_head = heads // world
    for rank in range(world):
        heads_r = slice(rank * per_head, (rank + 1) * per_head)
        # the all-to-all: every rank's local sequence, one after another, for this rank's heads -> (B, S, H_l, D)
        q_r, k_r, v_r = (torch.cat([x[w][:, heads_r] for w in range(world)], dim=2).transpose(1, 2) for x in local_qkv)
        mask_r = torch.cat(local_masks, dim=-1)
        local_call = _joint_call(segments[0], segments[1], heads, call.grid)
        out = shard_attention(q_r, k_r, v_r, mask_r, global_call(local_call, _config(world, rank)), edits,
                              (_sdpa, _sdpa), "auto", segments, world)
        out = out[:, gathered_order(segments, world)].transpose(1, 2)  # back to global order, (B, H_l, S, D)
        assert torch.allclose(out, reference[:, heads_r], atol=1e-5), rank


def test_headblend_maps_global_heads_to_the_local_slice():
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 4, 10, 4) for _ in range(3))
    call = AttentionCall(Site("blocks.2.attn1", "self", 2, 4), "wan", 0, ("cond",), (10,), 10, 10, slice(0, 10),
                         slice(0, 10), None, None, q.device, q.dtype)
    edit = HeadBlend(strength=1.0, heads={2: (1, 2)})
    full = attend(q, k, v, None, call, [edit], _sdpa)
    for offset in (0, 2):
        local = slice(offset, offset + 2)
        shard = dataclasses.replace(call, head_offset=offset)
        out = attend(q[:, local], k[:, local], v[:, local], None, shard, [edit], _sdpa)
        assert torch.allclose(out, full[:, local], atol=1e-6)


def test_text_mask_shards_match_the_rank_layout():
    mask = torch.tensor([True] * 8 + [True, True, True, False])[None, None, None]  # 8 video, 4 text keys
    for video, text in ((8, 4), (4, 2)):  # the block's inputs before and after the plan's split
        assert shard_text_mask(mask, video, text, 2, 0).flatten().tolist() == [True] * 6
        assert shard_text_mask(mask, video, text, 2, 1).flatten().tolist() == [True] * 5 + [False]
    with pytest.raises(ValueError, match="matches neither"):
        shard_text_mask(mask, 5, 4, 2, 0)


def test_ring_pairs_tell_which_rotations_are_empty():
    blocks = radial_block_mask(64, 256, 128, 0.2, sink=False)
    pairs = ring_pairs(blocks, 8)
    assert pairs.shape == (8, 8) and pairs.diagonal().all()
    assert torch.equal(ring_pairs(torch.eye(4, dtype=torch.bool), 2), torch.eye(2, dtype=torch.bool))


# --------------------------------------------------------------------------------------------------- bad input
def test_head_and_token_counts_the_degree_cannot_split(tiny_pipe):
    wan = tiny_pipe("wan").transformer  # 2 heads, patch (1, 2, 2)
    with pytest.raises(ValueError, match="2 attention heads, which Ulysses degree 3 cannot split"):
        check_heads(wan, 3)
    with pytest.raises(ValueError, match="must be an integer >= 2"):
        check_heads(wan, 1)
    with pytest.raises(ValueError, match="45 video tokens .5 latent frames x 3 x 3. cannot be split evenly over Ulysses degree 2"):
        check_tokens(wan, 2, (), {"hidden_states": torch.zeros(1, 16, 5, 6, 6)})
    check_tokens(wan, 2, (), {"hidden_states": torch.zeros(1, 16, 5, 4, 4)})
    hunyuan = tiny_pipe("hunyuan_video").transformer
    with pytest.raises(ValueError, match="17 text tokens cannot be split"):
        check_tokens(hunyuan, 2, (), {"hidden_states": torch.zeros(1, 4, 2, 4, 4), "encoder_hidden_states": torch.zeros(1, 17, 16)})
    with pytest.raises(ValueError, match="supports wan, hunyuan_video; got sd3"):
        check_heads(tiny_pipe("sd3").transformer, 2)
    with pytest.raises(ValueError, match="launch with torchrun"):
        enable_ulysses(tiny_pipe("wan"), 2)  # no process group in this process


# ------------------------------------------------------------------------------------- two processes over gloo
def _run(command: list[str], env: dict, timeout: float = 180) -> None:
    """Run a command in its own process group; on a timeout the whole group (torchrun's workers too) is killed."""
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"{command[:4]} timed out after {timeout} s:\n{output[-3000:]}")
    assert process.returncode == 0, output[-4000:]


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(), reason="no gloo")
def test_two_processes_give_the_one_process_videos(tmp_path):
    out = str(tmp_path / "videos")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("WORLD_SIZE", None)
    start = time.perf_counter()
    _run([sys.executable, str(WORKER), out], env)
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER), out], env)
    single = torch.load(f"{out}.single", weights_only=False)
    ranks = [torch.load(f"{out}.rank{r}", weights_only=False) for r in (0, 1)]
    for family in ("wan", "hunyuan_video"):
        assert single[f"{family}/tokens"] == 144 and ranks[0][f"{family}/tokens"] == 72  # really sharded
        for case in ("stock", "edits", "guidance"):
            video = single[f"{family}/{case}"]
            for rank in ranks:
                np.testing.assert_allclose(rank[f"{family}/{case}"], video, atol=1e-4, err_msg=f"{family}/{case}")
        assert np.abs(single[f"{family}/edits"] - single[f"{family}/stock"]).max() > 1e-3  # the edits do something
        maps = single[f"{family}/maps"]  # each rank records its own heads, over the whole sequence
        for rank, result in enumerate(ranks):
            np.testing.assert_allclose(result[f"{family}/maps"], maps[:, :, rank:rank + 1], atol=1e-5)
    assert "81 video tokens (9 latent frames x 3 x 3) cannot be split evenly over Ulysses degree 2" in ranks[0]["wan/error"]
    assert "17 text tokens cannot be split evenly" in ranks[1]["hunyuan_video/error"]
    assert time.perf_counter() - start < 120
