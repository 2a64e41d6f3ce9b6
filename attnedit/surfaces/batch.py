"""Batch jobs: many generations/edits from a JSONL or YAML spec, resumable, shardable across processes.

A job is a dict with a ``task`` (see :data:`TASKS`), an optional ``model`` and ``id``, and the task's
parameters. Every job's fields are checked (:mod:`attnedit.surfaces.params`) before any model is loaded.
Jobs run grouped by model with one loaded pipeline per model. Each job's outputs are written atomically, then its
JSON sidecar (``<id>.job.json``), which marks it done: a killed run started again skips every job whose sidecar
says done and redoes nothing. A failing job is recorded (``<id>.error.json``) and the others go on. Under
``accelerate launch`` each process takes every n-th job (n = number of processes).

Names: an id has no '.', so a job's files are ``<id>.png`` (one image), ``<id>.0000.png``... (several, or video
frames), ``<id>.mp4``, ``<id>.job.json``, ``<id>.error.json``; no job can reach another's files or the batch's own
(``summary.json``, hidden ``.summary.<rank>.json`` and ``.*.tmp``).
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

from attnedit.surfaces.interrupts import stop_if_interrupted
from attnedit.surfaces.outputs import atomic_write_json, save_mp4, save_png
from attnedit.surfaces.quantize import LOAD_FIELDS, load_fields
from attnedit.surfaces.jobfile_yaml import load_yaml
from attnedit.surfaces.params import check_id, check_model_kind, check_params, model_kind, pipeline_kind, text

MAX_JOB_FILE = 64 * 2**20  # bytes of a job file; also the budget of a YAML file's nodes after alias expansion

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
    load: dict[str, Any] = field(default_factory=dict)  # memory, quantize, lora, variant (quantize.load_fields)

    def record(self) -> dict[str, Any]:
        return {"id": self.id, "task": self.task, "model": self.model, **self.load, **self.params}


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
        return check_id(spec["id"])
    digest = hashlib.sha1(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"{spec.get('task', 'job')}-{digest}"


def parse_jobs(specs: list[Any], where: str = "spec") -> list[Job]:
    """Validate job dicts: known task, valid fields, unique ids (also ignoring case: macOS and Windows file names
    do), a model of the task's kind where the name tells. Errors name the job's position and the field."""
    jobs, seen = [], set()
    for index, spec in enumerate(specs, start=1):
        try:
            jobs.append(_parse_job(spec, seen))
        except ValueError as error:
            raise ValueError(f"{where} job {index}: {error}") from None
    return jobs


def _parse_job(spec: Any, seen: set[str]) -> Job:
    if not isinstance(spec, dict):
        raise ValueError(f"expected an object, got {type(spec).__name__}")
    name = spec.get("task")
    if name not in TASKS:
        raise ValueError(f"task={name!r}; valid: {sorted(TASKS)}")
    jid = job_id(spec)
    if jid.lower() in seen:
        raise ValueError(f"duplicate id {jid!r}")
    seen.add(jid.lower())
    model = spec.get("model")
    if model is not None:
        check_model_kind(text("model", model), name, model_kind(model))
    params = {k: v for k, v in spec.items() if k not in ("id", "task", "model", *LOAD_FIELDS)}
    if name in _FIELDS_CHECKED:
        params = check_params(name, params)
    return Job(jid, name, model, params, load_fields(spec))


_FIELDS_CHECKED = ("generate", "edit", "video")  # the built-in tasks; a task registered elsewhere checks its own


def load_jobs(path: str | Path) -> list[Job]:
    """Jobs from a .jsonl file (one object per line, # comments) or a .yaml/.yml file (a list, or {defaults, jobs})."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_JOB_FILE:
            raise ValueError(f"job file {str(path)!r} is larger than {MAX_JOB_FILE >> 20} MiB")
        content = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ValueError(f"cannot read job file {str(path)!r}: {error.strerror}") from None
    except UnicodeDecodeError:
        raise ValueError(f"job file {str(path)!r} is not UTF-8 text") from None
    if path.suffix in (".yaml", ".yml"):
        data = load_yaml(content, path, MAX_JOB_FILE)
        defaults = data.get("defaults", {}) if isinstance(data, dict) else {}
        specs = data.get("jobs", []) if isinstance(data, dict) else data
        if isinstance(data, dict) and set(data) - {"defaults", "jobs"}:
            raise ValueError(f"{path}: unknown top-level key(s) {sorted(map(str, set(data) - {'defaults', 'jobs'}))}; "
                             "valid: ['defaults', 'jobs']")
        if not isinstance(defaults, dict):
            raise ValueError(f"{path}: defaults={defaults!r} must be a mapping of job fields")
        if not isinstance(specs, list):
            raise ValueError(f"{path}: expected a list of jobs or a mapping with 'jobs'")
        return parse_jobs([{**defaults, **s} if isinstance(s, dict) else s for s in specs], str(path))
    specs = []
    for number, line in enumerate(content.splitlines(), start=1):
        if line.strip() and not line.lstrip().startswith("#"):
            try:
                specs.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not valid JSON: {error.msg}") from None
            except RecursionError:
                raise ValueError(f"{path}:{number}: nested too deeply") from None
    return parse_jobs(specs, str(path))


def is_done(out_dir: Path, job: Job) -> bool:
    """The job's sidecar exists and says done (a failure is never mistaken for it)."""
    try:
        return json.loads((out_dir / f"{job.id}.job.json").read_text()).get("status") == "done"
    except (OSError, ValueError, AttributeError):
        return False


def output_names(job: Job, count: int, video: bool) -> list[str]:
    """The files of a job with ``count`` images: ``<id>.png`` alone, else ``<id>.0000.png``... (plus ``<id>.mp4``)."""
    names = [f"{job.id}.mp4"] if video else []
    if count == 1 and not video:
        return [f"{job.id}.png"]
    return names + [f"{job.id}.{index:04d}.png" for index in range(count)]


def run_job(pipe: Any, job: Job, out_dir: Path, model_name: str | None) -> list[str]:
    """Run one job and write its outputs, then its sidecar (the done marker)."""
    from attnedit.surfaces.loading import tiny_defaults

    start = time.perf_counter()
    params = {**tiny_defaults(model_name, job.task), **job.params}
    images = TASKS[job.task](pipe, params)
    record = {**job.record(), "model": model_name or "default"}
    video = job.task in ("video", "edit-video")
    names = output_names(job, len(images) if not video or params.get("save_frames") else 0, video)
    try:
        if video:
            save_mp4(out_dir / names[0], images, int(params.get("fps", 16)))
        for name, image in zip(names[1:] if video else names, images):
            save_png(out_dir / name, image, record)
        atomic_write_json(out_dir / f"{job.id}.job.json", {"status": "done", "job": record, "outputs": names,
                                                           "seconds": round(time.perf_counter() - start, 3)})
    except BaseException:  # interrupted or failed half-way: no output of an unfinished job under its final name
        for name in names:
            (out_dir / name).unlink(missing_ok=True)
        raise
    (out_dir / f"{job.id}.error.json").unlink(missing_ok=True)
    return names


def run_batch(
    jobs: list[Job], out_dir: str | Path, load: Callable[[str | None], Any], *, default_model: str | None = None,
    process_index: int = 0, num_processes: int = 1, progress: bool = True,
) -> Summary:
    """Run this process's share of ``jobs`` into ``out_dir``; ``load(model)`` returns a pipeline."""
    from tqdm.auto import tqdm

    from attnedit.surfaces.loading import default_model as task_default_model

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(".*.tmp"):  # half-written files of a killed run (never renamed into place)
        stale.unlink(missing_ok=True)
    mine = [job for i, job in enumerate(jobs) if i % num_processes == process_index]
    summary = Summary(skipped=[j.id for j in mine if is_done(out_dir, j)])
    todo = [j for j in mine if not is_done(out_dir, j)]
    by_model: dict[tuple, list[Job]] = {}  # (model, loading options) -> its jobs
    for job in todo:
        options = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in job.load.items()))
        by_model.setdefault((job.model or default_model or task_default_model(job.task), options), []).append(job)
    bar = tqdm(total=len(todo), disable=not progress, desc=f"jobs[{process_index}]")
    for (model, options), group in by_model.items():
        try:
            pipe = load(model, **dict(options)) if options else load(model)
            kind = pipeline_kind(pipe)
        except Exception as error:  # a model that cannot load fails its jobs, not the batch
            for job in group:
                _fail(out_dir, job, summary, f"cannot load model {model!r}: {error}", bar)
            continue
        for job in group:
            bar.set_description(f"job {bar.n + 1}/{len(todo)} {job.id}")
            try:
                check_model_kind(model, job.task, kind)
                run_job(pipe, job, out_dir, model)
                summary.done.append(job.id)
            except Exception as error:
                _fail(out_dir, job, summary, f"{type(error).__name__}: {error}", bar, traceback.format_exc())
                continue
            finally:
                stop_if_interrupted()  # a Ctrl-C swallowed inside the job (e.g. by a finalizer) stops here
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
    """Text to image with a stock pipeline, optionally refocused to a ``layout`` and guided away from ``heads``.

    Parameters: prompt, negative_prompt, seed, steps, guidance_scale, width, height, num_images; ``layout`` (a
    refocusing layout: dict or JSON path; its prompt is used unless ``prompt`` is given), ``refocus_steps``,
    ``schedule`` (``ce0439c``, ``b79fba5``, ``fast``, ``fast-15`` or ``fast-front``);
    ``heads`` (head set, e.g. "L1H0,L1H1" or a ranking file), ``pag_scale``, ``pag_strength``.
    """
    import contextlib

    import torch

    params = check_params("generate", params)
    layout = _layout(params)
    prompt = params.get("prompt") or (layout.prompt if layout else "")
    steps = _check_steps(pipe, int(params.get("steps", 30)))
    from attnedit.shapes.builtin import call_options

    kwargs = {k: params[k] for k in ("negative_prompt", "guidance_scale", "width", "height") if k in params}
    kwargs.update(call_options(pipe))  # a built-in model's text length (shapes-dit's T5 was trained on 24 tokens)
    generator = torch.Generator("cpu").manual_seed(int(params.get("seed", 0)))
    guidance = contextlib.nullcontext()
    if params.get("heads"):
        from attnedit.methods.head_guidance import perturbed_guidance

        guidance = perturbed_guidance(pipe, params["heads"], scale=float(params.get("pag_scale", 3.0)),
                                      strength=float(params.get("pag_strength", 1.0)))
    with guidance:
        if layout is not None:
            return _refocused(pipe, layout, prompt, steps, generator, params, kwargs)
        return pipe(prompt=prompt, num_inference_steps=steps, generator=generator,
                    num_images_per_prompt=int(params.get("num_images", 1)), **kwargs).images


def _check_steps(pipe: Any, steps: int) -> int:
    """Fewer steps than the scheduler's training timesteps (DDIM at 1000 of 1000 indexes past its table)."""
    limit = getattr(getattr(getattr(pipe, "scheduler", None), "config", None), "num_train_timesteps", None)
    if isinstance(limit, int) and steps >= limit:
        raise ValueError(f"steps={steps} must be below this model's scheduler's num_train_timesteps={limit}")
    return steps


def _layout(params: dict[str, Any]) -> Any:
    if not params.get("layout"):
        return None
    from attnedit.methods.refocusing import Layout

    source = params["layout"]
    layout = Layout.from_dict(source) if isinstance(source, dict) else Layout.from_json(source)
    return Layout(params["prompt"], layout.regions) if params.get("prompt") else layout


def _refocused(pipe: Any, layout: Any, prompt: str, steps: int, generator: Any, params: dict, kwargs: dict) -> list:
    from attnedit.methods.refocusing import DEFAULT_SCHEDULE, RefocusConfig
    from attnedit.pipelines.refocusing import refocus

    config = RefocusConfig(schedule=params.get("schedule", DEFAULT_SCHEDULE), refocus_steps=params.get("refocus_steps"))
    return refocus(pipe, layout, config=config, num_inference_steps=steps, generator=generator, **kwargs).images


EDIT_OPERATIONS = ("remove", "move", "resize", "flip", "zoom-out", "pan", "compose")


@task("edit")
def edit_task(pipe: Any, params: dict[str, Any]) -> list:
    """DesignEdit operation on a real image: ``operation`` in EDIT_OPERATIONS, ``image``, ``mask`` (path or box
    [x0, y0, x1, y1]), ``dx``/``dy`` (move), ``scale`` (resize, zoom-out), ``direction`` (flip h|v; pan
    left|right|up|down), ``amount`` (pan, px), ``layers`` (compose: [{image, mask, dx, dy}]), ``steps``, ``dilation``,
    ``fill_dilation`` (zoom-out/pan),
    ``hole_noise`` (fresh noise in the hole), ``guidance_scale``; unset ones take the model family's defaults (SD, SDXL, SD3:
    CFG 7.5, no hole noise; FLUX: one pass, hole noise 1)."""
    from attnedit.pipelines.design_edit import DesignEditConfig, DesignEditor, ObjectLayer

    params = check_params("edit", params)
    operation = params["operation"]
    optional = {k: float(params[k]) for k in ("guidance_scale", "hole_noise") if params.get(k) is not None}
    if "fill_dilation" in params:  # zoom-out/pan's mask growth (the built-ins' edit defaults set it)
        optional["fill_dilation"] = int(params["fill_dilation"])
    config = DesignEditConfig(num_steps=_check_steps(pipe, int(params.get("steps", 50))), **optional)  # unset: the family's defaults
    editor, image, mask = DesignEditor(pipe, config), params["image"], _mask_value(params.get("mask"))
    extra = {"dilation": int(params["dilation"])} if "dilation" in params else {}
    if operation == "remove":
        return [editor.remove(image, mask, **extra)]
    if operation == "move":
        return [editor.move(image, mask, int(params.get("dx", 0)), int(params.get("dy", 0)), **extra)]
    if operation == "resize":
        return [editor.resize(image, mask, float(params.get("scale", 1.0)), **extra)]
    if operation == "flip":
        return [editor.flip(image, mask, params.get("direction", "h"), **extra)]
    if operation == "zoom-out":
        return [editor.zoom_out(image, float(params.get("scale", 0.5)), **extra)]
    if operation == "pan":
        return [editor.pan(image, params.get("direction", "left"), int(params.get("amount", 0)), **extra)]
    layers = [ObjectLayer(layer["image"], _mask_value(layer["mask"]), int(layer.get("dx", 0)), int(layer.get("dy", 0))) for layer in params.get("layers", [])]
    return [editor.compose(image, layers, remove=_mask_value(params.get("mask")))]


def _mask_value(mask: Any) -> Any:
    """A mask given as a list of 4 numbers is a box (x0, y0, x1, y1); anything else passes through."""
    return tuple(mask) if isinstance(mask, list) and len(mask) == 4 and all(isinstance(v, (int, float)) for v in mask) else mask


def _refuse_conditioned(pipe: Any) -> None:
    """Image-to-video, VACE and Animate pipelines need inputs the text-to-video task does not take: say so."""
    import inspect

    needed = [n for n, p in inspect.signature(pipe.__call__).parameters.items()
              if p.default is inspect.Parameter.empty and n in ("image", "pose_video", "face_video", "video")]
    if needed:
        raise ValueError(f"{type(pipe).__name__} needs {', '.join(needed)}; the video task makes videos from text "
                         "only: use the Python API for this pipeline")


@task("video")
def video_task(pipe: Any, params: dict[str, Any]) -> list:
    """Text to video (Wan, HunyuanVideo) with radial attention unless ``radial`` is false; returns the frames.

    Parameters: prompt, negative_prompt, seed, steps, guidance_scale, width, height, frames, radial (bool),
    dense_steps, dense_layers, decay, radial_preset, dense_tail_steps, max_sequence_length; fps and save_frames (PNG frames beside the MP4) are for the writer.
    """
    import torch
    from PIL import Image

    from attnedit.pipelines.radial import generate_radial

    params = check_params("video", params)
    _refuse_conditioned(pipe)
    kwargs = {k: params[k] for k in ("negative_prompt", "guidance_scale", "width", "height", "max_sequence_length")
              if k in params}
    kwargs.update(num_inference_steps=_check_steps(pipe, int(params.get("steps", 30))), output_type="np",
                  generator=torch.Generator("cpu").manual_seed(int(params.get("seed", 0))))
    if "frames" in params:
        kwargs["num_frames"] = int(params["frames"])
        stride = getattr(pipe, "vae_scale_factor_temporal", None)  # Wan, HunyuanVideo: 1 + a multiple of 4
        if isinstance(stride, int) and stride > 1 and (kwargs["num_frames"] - 1) % stride:
            near = 1 + stride * max(round((kwargs["num_frames"] - 1) / stride), 0)
            raise ValueError(f"frames={kwargs['num_frames']} must be 1 more than a multiple of {stride} for this "
                             f"model (e.g. {near}); diffusers would silently round it")
    params = {k: v for k, v in params.items() if k not in ("fps", "save_frames")}
    if params.get("radial", True):
        overrides = {k: params[k] for k in ("dense_steps", "dense_layers", "decay", "dense_tail_steps") if k in params}
        preset = params.get("radial_preset")
        frames = generate_radial(pipe, params["prompt"], preset=preset, radial=overrides, **kwargs).frames[0]
    else:
        frames = pipe(params["prompt"], **kwargs).frames[0]
    return [Image.fromarray((frame * 255).round().clip(0, 255).astype("uint8")) for frame in frames]


# edit-video (object removal from a real video) lives with its command; that module never imports this one
from attnedit.surfaces.video_edit_cli import edit_video_task  # noqa: E402

TASKS["edit-video"] = edit_video_task
