"""benchmarks/gpu_check.py: the dry run (tiny sizes, CPU) writes every section with numbers, and its flex fallback mask
is the one FlexAttention's create_block_mask builds.

The GPU run itself cannot be tested here; the dry run goes through the same code (sections, timing, JSON writing)
so that the one prepared GPU command does not fail on something a CPU could have caught.
"""

from __future__ import annotations

import json
import numbers
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "gpu_check.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}  # the CPU dry run, on any machine
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out)], check=False, cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not out.with_name(out.name + ".tmp").exists()  # written atomically
    return json.loads(out.read_text())


def _numbers(row: dict, *keys: str) -> None:
    for key in keys:
        assert isinstance(row.get(key), numbers.Real) and not isinstance(row[key], bool), (row.get("name"), key, row.get(key))


def test_dry_run_writes_every_section(dry_run):
    assert dry_run["dry_run"] is True
    assert set(dry_run["sections"]) == {"radial", "reference", "forwards", "xformers", "full"}
    env = dry_run["environment"]
    assert env["torch"] == torch.__version__ and env["diffusers"] and "xformers" in env and "device" in env
    for name, section in dry_run["sections"].items():
        assert "error" not in section, (name, section.get("error"))
        _numbers(section, "elapsed_s")


def test_dry_run_attention_call_sections(dry_run):
    radial, reference = dry_run["sections"]["radial"]["rows"], dry_run["sections"]["reference"]["rows"]
    assert radial and len(radial) == len(reference)
    for row in radial:
        assert "error" not in row, row
        _numbers(row, "tokens", "density", "dense_ms", "sparse_ms", "speedup", "ideal_speedup", "fraction_of_ideal")
        assert 0 < row["density"] < 1 and row["dense_kernel"]
    for row in reference:
        assert "error" not in row, row
        _numbers(row, "max_abs_diff", "mean_abs_diff", "ref_max_abs", "empty_query_rows")
        assert row["max_abs_diff"] < 1e-4  # float32 in the dry run: the sparse path equals the masked reference


def test_dry_run_forwards_cover_every_architecture_and_edit(dry_run):
    from attnedit.models.architectures import ARCHITECTURES

    rows = {row["name"]: row for row in dry_run["sections"]["forwards"]["rows"]}
    assert set(rows) == set(ARCHITECTURES)
    for name, row in rows.items():
        assert "error" not in row, row
        edits = row["edits"]
        expected = {"none", "key_mask", "head_blend", "perturbed_guidance"}
        if row["family"] in ("wan", "hunyuan_video"):
            expected.add("radial")
        assert expected <= set(edits), (name, sorted(edits))
        for label in expected:
            assert "error" not in edits[label], (name, label, edits[label])
            _numbers(edits[label], "stock_ms", "ms", "ratio", "max_abs_diff")
        assert edits["none"]["bit_identical"] is True and edits["none"]["max_abs_diff"] == 0
        assert edits["key_mask"]["bit_identical"] is False  # the edit did something


def test_dry_run_xformers_section_says_what_it_did(dry_run):
    section = dry_run["sections"]["xformers"]
    assert section["xformers"] == dry_run["environment"]["xformers"]
    assert section["xformers"] == "not installed" or "skipped" in section or section.get("rows")


def test_dry_run_full_section_has_every_model_edit_and_plan(dry_run):
    """Full depth is checked shape-wise (meta builds: parameter and token counts of the real sizes); the edits and
    plans run on the tiny denoisers and, being exact in float32, give the stock output under every plan."""
    rows = {row["name"]: row for row in dry_run["sections"]["full"]["rows"]}
    assert set(rows) == {"flux1-dev", "wan2.1-t2v-14b", "hunyuan-video"}
    expected = {"flux1-dev": (11.9, 4096), "wan2.1-t2v-14b": (14.29, 75600), "hunyuan-video": (12.82, 108000)}
    for name, (params_b, tokens) in expected.items():
        row = rows[name]
        assert "error" not in row, row
        assert abs(row["params_b"] - params_b) < 0.01 and row["tokens"] == tokens
        edits = {"key_mask", "soft_pag", "recorder"} | ({"radial"} if name != "flux1-dev" else set())
        assert set(row["edits"]) == edits
        for label in edits:
            assert "error" not in row["edits"][label], (name, label, row["edits"][label])
            _numbers(row["edits"][label], "ms", "ratio", "max_abs_diff")
        assert row["edits"]["key_mask"]["max_abs_diff"] > 0  # the edit did something
        assert set(row["plans"]) == {"none", "model-offload", "group-offload", "sequential-offload"}
        for label, plan in row["plans"].items():
            assert "error" not in plan, (name, label, plan)
            _numbers(plan, "ms")
            if label != "none":
                assert plan["max_abs_diff"] == 0, (name, label)  # offloading moves weights, never changes them
    quantized = rows["flux1-dev"]["quantized"]  # torchao weight-only on a fresh denoiser, with and without a key mask
    _numbers(quantized["int8"], "ms", "ratio", "max_abs_diff")
    assert 0 < quantized["int8"]["max_abs_diff"] < 0.1 and quantized["int8"]["key_mask"]["max_abs_diff"] > 0
    assert "compute capability 8.9" in quantized["fp8"]["error"]  # the dry run is on the CPU: attnedit's refusal
