"""Batch jobs: outputs with parameters, failures isolated, resume after a kill, 2-process accelerate sharding."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from attnedit.surfaces.cli import main
from attnedit.surfaces.outputs import read_png_parameters


def write_jobs(path: Path, jobs: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(j) for j in jobs) + "\n")
    return path


def jobs_for(n: int, steps: int = 2) -> list[dict]:
    return [{"task": "generate", "id": f"j{i}", "prompt": f"a red circle {i}", "seed": i, "steps": steps} for i in range(n)]


def test_batch_writes_images_sidecars_and_summary(tmp_path):
    spec = write_jobs(tmp_path / "jobs.jsonl", jobs_for(3))
    assert main(["batch", str(spec), "--out", str(tmp_path / "out")]) == 0
    out = tmp_path / "out"
    for i in range(3):
        params = read_png_parameters(out / f"j{i}.png")
        assert params["prompt"] == f"a red circle {i}" and params["seed"] == i
        assert json.loads((out / f"j{i}.job.json").read_text())["outputs"] == [f"j{i}.png"]
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(summary["done"]) == ["j0", "j1", "j2"] and not summary["failed"]


def test_failing_job_is_reported_and_the_rest_go_on(tmp_path, capsys):
    jobs = jobs_for(2) + [{"task": "generate", "id": "bad", "prompt": "x", "heads": "L99H0", "steps": 2}]
    spec = write_jobs(tmp_path / "jobs.jsonl", jobs)  # the head exists in no model: found when its model is loaded
    assert main(["batch", str(spec), "--out", str(tmp_path / "out")]) == 1
    assert "failed bad: ValueError:" in capsys.readouterr().err
    assert (tmp_path / "out" / "j1.png").exists() and (tmp_path / "out" / "bad.error.json").exists()
    assert main(["batch", str(spec), "--out", str(tmp_path / "out")]) == 1  # rerun: done skipped, failure retried
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert sorted(summary["skipped"]) == ["j0", "j1"] and list(summary["failed"]) == ["bad"]


def test_yaml_spec_with_defaults(tmp_path):
    spec = tmp_path / "jobs.yaml"
    spec.write_text("defaults: {task: generate, steps: 2}\njobs:\n  - {id: a, prompt: a cat}\n  - {id: b, prompt: a dog}\n")
    assert main(["batch", str(spec), "--out", str(tmp_path / "out")]) == 0
    assert read_png_parameters(tmp_path / "out" / "b.png")["steps"] == 2


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"task": "paint", "prompt": "x"}\n', "task='paint'; valid:"),
        ('{"task": "generate", "prompt": "x"\n', "jobs.jsonl:1: not valid JSON"),
        ('{"task": "generate", "id": "a", "prompt": "x"}\n{"task": "generate", "id": "a", "prompt": "y"}\n', "duplicate id 'a'"),
    ],
)
def test_bad_job_files_exit_2_with_one_line(tmp_path, capsys, content, message):
    (tmp_path / "jobs.jsonl").write_text(content)
    assert main(["batch", str(tmp_path / "jobs.jsonl"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_missing_job_file_exits_2(tmp_path, capsys):
    assert main(["batch", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path)]) == 2
    assert "cannot read job file" in capsys.readouterr().err


def _cli(*args: str, env: dict | None = None) -> list[str]:
    return [sys.executable, "-m", "attnedit", *args]


def test_resume_after_kill_loses_and_redoes_nothing(tmp_path):
    spec = write_jobs(tmp_path / "jobs.jsonl", jobs_for(8, steps=30))
    out = tmp_path / "out"
    env = {**os.environ, "ATTNEDIT_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(_cli("batch", str(spec), "--out", str(out)), env=env, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(list(out.glob("j*.job.json"))) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = {p.name.split(".")[0]: (out / f"{p.name.split('.')[0]}.png").stat().st_mtime_ns
                for p in out.glob("j*.job.json")}
    assert 2 <= len(finished) < 8, "the kill should land mid-batch"
    assert main(["batch", str(spec), "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(summary["skipped"]) == sorted(finished)
    assert sorted(summary["done"] + summary["skipped"]) == [f"j{i}" for i in range(8)]
    assert all((out / f"{name}.png").stat().st_mtime_ns == mtime for name, mtime in finished.items())
    assert not list(out.glob(".*.tmp"))


@pytest.mark.skipif(shutil.which("accelerate") is None, reason="accelerate launcher not on PATH")
def test_two_process_accelerate_run_shards_jobs(tmp_path):
    spec = write_jobs(tmp_path / "jobs.jsonl", jobs_for(4))
    out = tmp_path / "out"
    env = {**os.environ, "ATTNEDIT_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    # accelerate's multi-process launcher is `--multi_gpu`; without CUDA it runs CPU processes over gloo
    command = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", "-m", "attnedit", "batch", str(spec), "--out", str(out), "--device", "cpu"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    ranks = [json.loads((out / f".summary.{r}.json").read_text())["done"] for r in range(2)]
    assert sorted(ranks[0]) == ["j0", "j2"] and sorted(ranks[1]) == ["j1", "j3"]
    assert all((out / f"j{i}.png").exists() for i in range(4))
    assert "4 done" in result.stdout


def test_mixed_tasks_and_models_in_one_batch(tmp_path):
    """generate, edit and video jobs; one pipeline per model; a video job writes an MP4."""
    from PIL import Image

    photo = tmp_path / "photo.png"
    Image.new("RGB", (64, 48), (200, 30, 30)).save(photo)
    jobs = [
        {"task": "edit", "id": "e", "operation": "remove", "image": str(photo), "mask": [8, 8, 24, 24], "steps": 3},
        {"task": "video", "id": "v", "model": "tiny:wan", "prompt": "a ball", "steps": 2},
        {"task": "generate", "id": "g", "prompt": "a cat", "steps": 2},
    ]
    spec = write_jobs(tmp_path / "jobs.jsonl", jobs)
    assert main(["batch", str(spec), "--out", str(tmp_path / "out")]) == 0
    out = tmp_path / "out"
    assert Image.open(out / "e.png").size == (64, 48)
    assert json.loads((out / "v.job.json").read_text())["outputs"] == ["v.mp4"]
    assert (out / "v.mp4").stat().st_size > 0 and not list(out.glob("v.*.png"))


def test_no_job_reaches_another_jobs_files_or_the_batch_records(tmp_path):
    """Job `a` with two images, a job with id `a_0` and one with id `summary`: every output survives."""
    jobs = [{"task": "generate", "id": "a", "prompt": "a red circle", "num_images": 2, "steps": 2},
            {"task": "generate", "id": "a_0", "prompt": "a blue square", "steps": 2},
            {"task": "generate", "id": "summary", "prompt": "a green circle", "steps": 2}]
    out = tmp_path / "out"
    assert main(["batch", str(write_jobs(tmp_path / "jobs.jsonl", jobs)), "--out", str(out)]) == 0
    assert json.loads((out / "a.job.json").read_text())["outputs"] == ["a.0000.png", "a.0001.png"]
    assert read_png_parameters(out / "a.0000.png")["id"] == "a" and read_png_parameters(out / "a_0.png")["id"] == "a_0"
    assert read_png_parameters(out / "summary.png")["id"] == "summary"
    assert sorted(json.loads((out / "summary.json").read_text())["done"]) == ["a", "a_0", "summary"]
    assert json.loads((out / "summary.job.json").read_text())["status"] == "done"


def test_a_failed_job_never_counts_as_done(tmp_path):
    from attnedit.surfaces.batch import Job, is_done

    job = Job("x", "generate", None, {"prompt": "x"})
    assert not is_done(tmp_path, job)
    (tmp_path / "x.job.json").write_text('{"status": "failed"}')
    assert not is_done(tmp_path, job)
    (tmp_path / "x.job.json").write_text("{truncated")
    assert not is_done(tmp_path, job)
    (tmp_path / "x.job.json").write_text('{"status": "done"}')
    assert is_done(tmp_path, job)


def test_a_job_interrupted_while_saving_leaves_no_output(tmp_path, monkeypatch):
    from PIL import Image

    from attnedit.surfaces import batch

    monkeypatch.setitem(batch.TASKS, "fake", lambda pipe, params: [Image.new("RGB", (8, 8))] * 3)
    saved = []

    def save_png(path, image, record):
        if saved:
            raise KeyboardInterrupt
        saved.append(path)
        path.write_bytes(b"png")

    monkeypatch.setattr(batch, "save_png", save_png)
    with pytest.raises(KeyboardInterrupt):
        batch.run_job(None, batch.Job("a", "fake", None, {}), tmp_path, "tiny:sd15")
    assert saved == [tmp_path / "a.0000.png"] and not list(tmp_path.iterdir())
