"""Batch jobs: many generations/edits from a JSONL or YAML spec, resumable, shardable across processes.

A job is a dict with a ``task`` (see :data:`TASKS`), an optional ``model`` and ``id``, and the task's
parameters. Jobs run grouped by model with one loaded pipeline per model. Each job's outputs are written
atomically, then its JSON sidecar (``<id>.json``), which marks it done: a killed run started again skips
every job whose sidecar exists and redoes nothing. A failing job is recorded (``<id>.error.json``) and the
others go on. Under ``accelerate launch`` each process takes every n-th job (n = number of processes).
"""

from __future__ import annotations

import hashlib
import json
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .outputs import atomic_write_json, save_png

Task = Callable[[Any, dict[str, Any]], list]  # (pipeline, params) -> list of PIL images
TASKS: dict[str, Task] = {}


def task(name: str) -> Callable[[Task], Task]:
    """Register a batch task under ``name``."""

    def register(fn: Task) -> Task:
        TASKS[name] = fn
        return fn

    return register


@dataclass(frozen=True)
class Job:
    id: str
    task: str
    model: str | None
    params: dict[str, Any]

    def record(self) -> dict[str, Any]:
        return {"id": self.id, "task": self.task, "model": self.model, **self.params}


@dataclass
class Summary:
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)

    def merge(self, other: Summary) -> Summary:
        return Summary(self.done + other.done, self.skipped + other.skipped, {**self.failed, **other.failed})

    def line(self) -> str:
        return f"{len(self.done)} done, {len(self.skipped)} skipped (already done), {len(self.failed)} failed"


def job_id(spec: dict[str, Any]) -> str:
    """Explicit ``id``, else a stable hash of the job's content (same job -> same outputs -> resumable)."""
    if "id" in spec:
        value = str(spec["id"])
        if not value or any(c in value for c in "/\\\0") or value.startswith("."):
            raise ValueError(f"job id {value!r} must be a plain file name")
        return value
    digest = hashlib.sha1(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"{spec.get('task', 'job')}-{digest}"


def parse_jobs(specs: list[Any], where: str = "spec") -> list[Job]:
    """Validate job dicts: known task, unique ids. Errors name the job's position."""
    jobs, seen = [], set()
    for index, spec in enumerate(specs, start=1):
        if not isinstance(spec, dict):
            raise ValueError(f"{where} job {index}: expected an object, got {type(spec).__name__}")
        name = spec.get("task")
        if name not in TASKS:
            raise ValueError(f"{where} job {index}: task={name!r}; valid: {sorted(TASKS)}")
        jid = job_id(spec)
        if jid in seen:
            raise ValueError(f"{where} job {index}: duplicate id {jid!r}")
        seen.add(jid)
        params = {k: v for k, v in spec.items() if k not in ("id", "task", "model")}
        jobs.append(Job(jid, name, spec.get("model"), params))
    return jobs


def load_jobs(path: str | Path) -> list[Job]:
    """Jobs from a .jsonl file (one object per line, # comments) or a .yaml/.yml file (a list, or {defaults, jobs})."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise ValueError(f"cannot read job file {str(path)!r}: {error.strerror}") from None
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ValueError(f"{path}: not valid YAML: {error}") from None
        defaults = data.get("defaults", {}) if isinstance(data, dict) else {}
        specs = data.get("jobs", []) if isinstance(data, dict) else data
        if not isinstance(specs, list):
            raise ValueError(f"{path}: expected a list of jobs or a mapping with 'jobs'")
        return parse_jobs([{**defaults, **s} if isinstance(s, dict) else s for s in specs], str(path))
    specs = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip() and not line.lstrip().startswith("#"):
            try:
                specs.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not valid JSON: {error.msg}") from None
    return parse_jobs(specs, str(path))


def is_done(out_dir: Path, job: Job) -> bool:
    return (out_dir / f"{job.id}.json").exists()


def run_job(pipe: Any, job: Job, out_dir: Path, model_name: str) -> list[str]:
    """Run one job and write its outputs, then its sidecar (the done marker)."""
    start = time.perf_counter()
    images = TASKS[job.task](pipe, job.params)
    record = {**job.record(), "model": model_name}
    names = []
    for index, image in enumerate(images):
        name = f"{job.id}.png" if len(images) == 1 else f"{job.id}_{index}.png"
        save_png(out_dir / name, image, record)
        names.append(name)
    atomic_write_json(out_dir / f"{job.id}.json", {"status": "done", "job": record, "outputs": names,
                                                   "seconds": round(time.perf_counter() - start, 3)})
    (out_dir / f"{job.id}.error.json").unlink(missing_ok=True)
    return names


def run_batch(
    jobs: list[Job], out_dir: str | Path, load: Callable[[str | None], Any], *, default_model: str | None = None,
    process_index: int = 0, num_processes: int = 1, progress: bool = True,
) -> Summary:
    """Run this process's share of ``jobs`` into ``out_dir``; ``load(model)`` returns a pipeline."""
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(".*.tmp"):  # half-written files of a killed run (never renamed into place)
        stale.unlink(missing_ok=True)
    mine = [job for i, job in enumerate(jobs) if i % num_processes == process_index]
    summary = Summary(skipped=[j.id for j in mine if is_done(out_dir, j)])
    todo = [j for j in mine if not is_done(out_dir, j)]
    by_model: dict[str | None, list[Job]] = {}
    for job in todo:
        by_model.setdefault(job.model or default_model, []).append(job)
    bar = tqdm(total=len(todo), disable=not progress, desc=f"jobs[{process_index}]")
    for model, group in by_model.items():
        try:
            pipe = load(model)
        except Exception as error:  # a model that cannot load fails its jobs, not the batch
            for job in group:
                _fail(out_dir, job, summary, f"cannot load model {model!r}: {error}", bar)
            continue
        for job in group:
            try:
                run_job(pipe, job, out_dir, model or "default")
                summary.done.append(job.id)
            except Exception as error:
                _fail(out_dir, job, summary, f"{type(error).__name__}: {error}", bar, traceback.format_exc())
                continue
            bar.update(1)
    bar.close()
    return summary


def _fail(out_dir: Path, job: Job, summary: Summary, message: str, bar: Any, trace: str = "") -> None:
    summary.failed[job.id] = message
    atomic_write_json(out_dir / f"{job.id}.error.json", {"status": "failed", "job": job.record(), "error": message, "traceback": trace})
    bar.update(1)


# --- built-in tasks -------------------------------------------------------------------------------------------


@task("generate")
def generate_task(pipe: Any, params: dict[str, Any]) -> list:
    """Text to image with a stock pipeline: prompt, negative_prompt, seed, steps, guidance_scale, width, height."""
    import torch

    allowed = {"prompt", "negative_prompt", "seed", "steps", "guidance_scale", "width", "height", "num_images"}
    unknown = set(params) - allowed
    if unknown:
        raise ValueError(f"generate: unknown parameter(s) {sorted(unknown)}; valid: {sorted(allowed)}")
    if not str(params.get("prompt", "")).strip():
        raise ValueError("generate: prompt is required")
    if int(params.get("steps", 30)) < 1:
        raise ValueError(f"generate: steps={params['steps']} must be >= 1")
    kwargs = {k: params[k] for k in ("negative_prompt", "guidance_scale", "width", "height") if k in params}
    generator = torch.Generator("cpu").manual_seed(int(params.get("seed", 0)))
    return pipe(params["prompt"], num_inference_steps=int(params.get("steps", 30)), generator=generator,
                num_images_per_prompt=int(params.get("num_images", 1)), **kwargs).images
