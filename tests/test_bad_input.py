"""Every bad input a hostile but ordinary user tried, on every subcommand and job-file field: one line naming the
argument and the value, exit code 2, nothing written, all before any model loads. The tables below are the record
of the inputs tried (issue 25.4). Also: Ctrl-C, start-up time, and the diffusers version check."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
from PIL import Image

from attnedit.surfaces.cli import main

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "ATTNEDIT_NO_PROGRESS": "1"}


def huge_png(path: Path, width: int = 20000, height: int = 20000) -> Path:
    """A valid PNG header claiming width x height (a few bytes: readers that trust it allocate gigabytes)."""
    Image.new("L", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("inputs")
    Image.new("RGB", (64, 64), (200, 30, 30)).save(root / "photo.png")
    (root / "notes.png").write_text("not an image")
    (root / "afile").write_text("x")
    (root / "folder.png").mkdir()
    (root / "jobs.jsonl").write_text(json.dumps({"task": "generate", "prompt": "a cat", "steps": 2}) + "\n")
    huge_png(root / "huge.png")
    return {"photo": str(root / "photo.png"), "notes": str(root / "notes.png"), "afile": str(root / "afile"),
            "huge": str(root / "huge.png"), "root": str(root), "jobs": str(root / "jobs.jsonl")}


CLI_CASES = [  # (arguments, what the one line must say); {out} is a fresh path that must stay absent
    (["generate", "a cat", "--width", "0"], "--width=0 must be an integer in [8, 8192]"),
    (["generate", "a cat", "--width", "-64"], "--width=-64"),
    (["generate", "a cat", "--width", "20000", "--height", "20000"], "--width=20000"),
    (["generate", "a cat", "--height", "abc"], "argument --height: invalid int value: 'abc'"),
    (["generate", "a cat", "--steps", "0"], "--steps=0"),
    (["generate", "a cat", "--steps", "-5"], "--steps=-5"),
    (["generate", "a cat", "--steps", "1000"], "steps=1000 must be below this model's scheduler's num_train_timesteps"),
    (["generate", "a cat", "--guidance", "nan"], "--guidance=nan must be a finite number"),
    (["generate", "a cat", "--guidance", "inf"], "--guidance=inf"),
    (["generate", "a cat", "--seed", "-1"], "--seed=-1"),
    (["generate", "a cat", "--pag-strength", "2"], "--pag-strength=2.0"),
    (["generate", "a cat", "--pag-scale", "nan", "--heads", "L1H0"], "--pag-scale=nan"),
    (["generate", "a cat", "--refocus-steps", "-1"], "--refocus-steps=-1"),
    (["generate", "   "], "generate: prompt is required"),
    (["generate", "a cat", "--dtype", "float64"], "argument --dtype: invalid choice: 'float64'"),
    (["generate", "a cat", "--device", "cuda:99"], "--device='cuda:99': this machine has"),
    (["generate", "a cat", "--device", "tpu"], "--device='tpu'"),
    (["generate", "a cat", "--model", "shapes-t2v"], "model='shapes-t2v' is a video model; generate needs an image"),
    (["generate", "a cat", "--model", "tiny:wan"], "model='tiny:wan' is a video model"),
    (["generate", "a cat", "--model", "tiny:nope"], "unknown tiny model 'tiny:nope'"),
    (["generate", "a cat", "--out", "{root}/x.jpg"], "must end in .png"),
    (["generate", "a cat", "--out", "{root}/folder.png"], "is a folder"),
    (["generate", "a cat", "--out", "{afile}/x.png"], "is not a folder"),
    (["generate", "--layout", '{{"prompt": "a dog", "regions": [{{"phrase": "dog"}}]}}'], "--layout="),
    (["generate", "--layout", "{root}/nope.json"], "nope.json"),
    (["generate", "a cat", "--bogus"], "unrecognized arguments: --bogus"),
    (["edit", "remove", "{photo}"], "edit remove: --mask is required"),
    (["edit", "remove", "{huge}", "--box", "1,1,5,5"], "larger than 8192x8192"),
    (["edit", "remove", "{notes}", "--box", "1,1,5,5"], "not a readable image"),
    (["edit", "remove", "{root}/missing.png", "--box", "1,1,5,5"], "No such file"),
    (["edit", "remove", "{photo}", "--box", "5,5,1,1"], "--box=[5, 5, 1, 1] must be a box"),
    (["edit", "remove", "{photo}", "--box", "1,2,3"], "--box='1,2,3' must be x0,y0,x1,y1"),
    (["edit", "remove", "{photo}", "--mask", "{notes}"], "--mask="),
    (["edit", "resize", "{photo}", "--box", "8,8,30,30", "--scale", "inf"], "--scale=inf"),
    (["edit", "resize", "{photo}", "--box", "8,8,30,30", "--scale", "0"], "--scale=0"),
    (["edit", "zoom-out", "{photo}", "--scale", "1.5"], "--scale=1.5 for zoom-out must be in (0, 1)"),
    (["edit", "flip", "{photo}", "--box", "1,1,9,9", "--direction", "left"], "--direction='left' for flip"),
    (["edit", "pan", "{photo}", "--direction", "sideways"], "--direction='sideways'"),
    (["edit", "pan", "{photo}", "--amount", "-4"], "--amount=-4"),
    (["edit", "move", "{photo}", "--box", "1,1,9,9", "--dx", "99999"], "--dx=99999"),
    (["edit", "remove", "{photo}", "--box", "1,1,9,9", "--dilation", "-1"], "--dilation=-1"),
    (["edit", "remove", "{photo}", "--box", "1,1,9,9", "--hole-noise", "nan"], "--hole-noise=nan"),
    (["edit", "remove", "{photo}", "--box", "1,1,9,9", "--steps", "0"], "--steps=0"),
    (["edit", "compose", "{photo}"], "edit compose: --layer is required"),
    (["edit", "compose", "{photo}", "--layer", "a:b:c"], "--layer='a:b:c' must be IMAGE:MASK:DX:DY"),
    (["edit", "compose", "{photo}", "--layer", "{photo}:{photo}:x:1"], "must be IMAGE:MASK:DX:DY"),
    (["edit", "compose", "{photo}", "--layer", "{notes}:{photo}:1:1"], "--layer[0].image="),
    (["edit", "remove", "{photo}", "--box", "1,1,9,9", "--model", "shapes-t2v"], "edit needs an image model"),
    (["edit", "remove", "{photo}", "--box", "1,1,9,9", "--out", "{root}/e.gif"], "must end in .png"),
    (["edit", "paint", "{photo}"], "argument operation: invalid choice: 'paint'"),
    (["video", "a ball", "--frames", "0"], "--frames=0 must be an integer in [1, 1024]"),
    (["video", "a ball", "--frames", "-3"], "--frames=-3"),
    (["video", "a ball", "--frames", "100000"], "--frames=100000"),
    (["video", "a ball", "--width", "0"], "--width=0"),
    (["video", "a ball", "--fps", "0"], "--fps=0"),
    (["video", "a ball", "--model", "shapes-t2i"], "model='shapes-t2i' is an image model; video needs a video"),
    (["video", "a ball", "--decay", "nan"], "--decay=nan"),
    (["video", "a ball", "--dense-steps", "-1"], "--dense-steps=-1"),
    (["video", "a ball", "--out", "{root}/v.png"], "must end in .mp4"),
    (["video", "a ball", "--ulysses", "0"], "--ulysses=0"),
    (["video", "a ball", "--save-frames", "--out", "{afile}.mp4"], "(the frames folder) is a file"),
    (["video", "a ball", "--frames", "4"], "frames=4 must be 1 more than a multiple of 2 for this model"),
    (["heads", "--model", "tiny:sd3", "--prompt", "a", "--steps", "0"], "--steps=0"),
    (["heads", "--prompt", "a", "--strength", "nan"], "--strength=nan"),
    (["heads", "--prompt", "a", "--seeds", "-1"], "--seeds=-1"),
    (["heads", "--model", "tiny:wan", "--prompt", "a"], "model='tiny:wan' is a video model; heads needs an image"),
    (["heads", "--prompt", "a", "--bogus"], "unrecognized arguments: --bogus"),
    (["app", "--port", "99999"], "--port=99999 must be an integer in [1, 65535]"),
    (["app", "--port", "0"], "--port=0"),
    (["sites", "--model", "nonexistent/model"], "model_index.json"),
    (["batch", "{jobs}", "--out", "{afile}"], "is a file; give a folder"),
    (["batch", "{jobs}", "--out", "{root}/b", "--device", "cuda:99"], "--device='cuda:99'"),
    (["batch", "{jobs}", "--out", "{root}/b", "--model", "shapes-t2v"], "is a video model; generate needs"),
    (["batch", "{root}/nope.jsonl", "--out", "{root}/b"], "cannot read job file"),
    (["sites", "--device", "cuda:99"], "--device='cuda:99'"),
    (["sites", "--dtype", "int8"], "argument --dtype: invalid choice: 'int8'"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    ([], "the following arguments are required: command"),
]


def _exit_code(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exit_info:  # argparse
        return exit_info.code


@pytest.mark.parametrize("args, message", CLI_CASES, ids=[" ".join(a)[:60] for a, _ in CLI_CASES])
def test_bad_cli_input_is_one_line_exit_2_and_writes_nothing(files, tmp_path, capsys, args, message):
    args = [a.format(**files) for a in args]
    default_out = [] if not args or args[0] not in ("generate", "edit", "video") or "--out" in args else [
        "--out", str(tmp_path / ("o.mp4" if args[0] == "video" else "o.png"))]
    before = set(Path(files["root"]).rglob("*"))
    assert _exit_code(args + default_out) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error:" in err[0] and message in err[0], err
    assert not list(tmp_path.iterdir()) and set(Path(files["root"]).rglob("*")) == before


BATCH_CASES = [  # (job file name, content, message); {photo} etc. from the fixture
    ("j.jsonl", '{"task": "generate", "prompt": "x", "width": 0}', "j.jsonl job 1: width=0 must be an integer"),
    ("j.jsonl", '{"task": "generate", "prompt": "x", "guidance_scale": NaN}', "guidance_scale=nan"),
    ("j.jsonl", '{"task": "generate", "prompt": "x", "steps": true}', "steps=True must be an integer"),
    ("j.jsonl", '{"task": "generate", "prompt": "x", "seed": "1"}', "seed='1'"),
    ("j.jsonl", '{"task": "generate", "prompt": "x", "num_images": 0}', "num_images=0"),
    ("j.jsonl", '{"task": "generate", "prompt": 5}', "prompt=5 must be a string"),
    ("j.jsonl", '{"task": "generate", "prompt": "x", "colour": "red"}', "unknown parameter(s) ['colour']"),
    ("j.jsonl", '{"task": "generate", "prompt": "x", "model": "tiny:wan"}', "is a video model; generate needs"),
    ("j.jsonl", '{"task": "generate", "prompt": "x", "model": 7}', "model=7 must be a string"),
    ("j.jsonl", '{"task": "video", "prompt": "x", "frames": 0}', "frames=0"),
    ("j.jsonl", '{"task": "video", "prompt": "x", "fps": 0}', "fps=0"),
    ("j.jsonl", '{"task": "video", "prompt": "x", "radial": "no"}', "radial='no' must be true or false"),
    ("j.jsonl", '{"task": "video", "prompt": "x", "model": "shapes-t2i"}', "is an image model; video needs"),
    ("j.jsonl", '{"task": "edit", "operation": "remove", "image": "{root}/missing.png", "mask": [1, 1, 4, 4]}',
     "image="),
    ("j.jsonl", '{"task": "edit", "operation": "remove", "image": "{huge}", "mask": [1, 1, 4, 4]}', "larger than"),
    ("j.jsonl", '{"task": "edit", "operation": "remove", "image": "{photo}", "mask": [1, 2, 3]}', "mask=[1, 2, 3]"),
    ("j.jsonl", '{"task": "edit", "operation": "compose", "image": "{photo}", "layers": [{"image": "{photo}"}]}',
     "layers[0]="),
    ("j.jsonl", '{"task": "edit", "operation": "resize", "image": "{photo}", "mask": [1, 1, 9, 9], "scale": 1e999}',
     "scale=inf"),
    ("j.jsonl", '{"task": "generate", "layout": {"prompt": "a dog", "regions": [{"phrase": "dog"}]}}', "layout="),
    ("j.jsonl", '{"task": "generate", "id": "a.b", "prompt": "x"}', "id='a.b' must be 1-100 characters"),
    ("j.jsonl", '{"task": "generate", "id": "x.error", "prompt": "x"}', "id='x.error'"),
    ("j.jsonl", '{"task": "generate", "id": "../evil", "prompt": "x"}', "id='../evil'"),
    ("j.jsonl", '{"task": "generate", "id": "", "prompt": "x"}', "id=''"),
    ("j.jsonl", '{"task": "generate", "id": true, "prompt": "x"}', "id=True"),
    ("j.jsonl", '{"task": "generate", "id": "' + "a" * 300 + '", "prompt": "x"}', "must be 1-100 characters"),
    ("j.jsonl", '{"task": "generate", "id": "A", "prompt": "x"}\n{"task": "generate", "id": "a", "prompt": "y"}',
     "job 2: duplicate id 'a'"),
    ("j.jsonl", "[1, 2]", "job 1: expected an object, got list"),
    ("j.jsonl", "[" * 100000, "nested too deeply"),
    ("j.yaml", "defaults: [1, 2]\njobs: []\n", "defaults=[1, 2] must be a mapping"),
    ("j.yaml", "jobs: {a: 1}\n", "expected a list of jobs"),
    ("j.yaml", "defaults: {}\njobz: []\n", "unknown top-level key(s) ['jobz']"),
    ("j.yaml", "jobs: [\n", "not valid YAML"),
    ("j.yaml", "jobs: !!python/object/apply:os.system [echo hi]\n", "not valid YAML"),
    ("j.yaml", "jobs: &a [*a]\n", "a recursive alias"),
    ("j.yaml", "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]\n" for i in range(8)) + "jobs: [*i]\n",
     "(an alias bomb?)"),
    ("j.yaml", "- {task: generate, prompt: x, width: .nan}\n", "width=nan"),
]


@pytest.mark.parametrize("name, content, message", BATCH_CASES, ids=[c[1][:50] for c in BATCH_CASES])
def test_bad_job_file_is_one_line_exit_2_and_writes_nothing(files, tmp_path, capsys, name, content, message):
    spec = tmp_path / name
    spec.write_text(content.replace("{photo}", files["photo"]).replace("{huge}", files["huge"])
                    .replace("{root}", files["root"]) + "\n")
    started = time.perf_counter()
    assert main(["batch", str(spec), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists() and time.perf_counter() - started < 10


def test_ctrl_c_during_generate_is_one_line_exit_130_and_no_output(tmp_path, capsys, monkeypatch):
    from attnedit.surfaces import batch

    def interrupted(pipe, params):
        raise KeyboardInterrupt

    monkeypatch.setitem(batch.TASKS, "generate", interrupted)
    assert main(["generate", "a cat", "--out", str(tmp_path / "o.png")]) == 130
    assert capsys.readouterr().err.strip().splitlines() == ["attnedit: interrupted"]
    assert not list(tmp_path.iterdir())


def test_interrupted_save_leaves_no_frames_under_final_names(tmp_path, monkeypatch):
    from attnedit.surfaces import cli_base, outputs

    calls = []

    def save_png(path, image, params):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"png")

    monkeypatch.setattr(outputs, "save_png", save_png)
    frames = [Image.new("RGB", (8, 8))] * 3
    with pytest.raises(KeyboardInterrupt):
        cli_base.save_outputs(tmp_path / "v.mp4", frames, {}, video=True, frames=True, fps=8)
    assert not (tmp_path / "v.mp4").exists() and not list((tmp_path / "v").glob("*.png"))


def test_ctrl_c_during_batch_exits_130_without_trace_and_resumes(tmp_path):
    import signal

    jobs = [{"task": "generate", "id": f"j{i}", "prompt": f"a red circle {i}", "steps": 6} for i in range(40)]
    spec = tmp_path / "jobs.jsonl"
    spec.write_text("\n".join(json.dumps(j) for j in jobs) + "\n")
    out = tmp_path / "out"
    # A runner that starts pytest in the background ignores SIGINT, and children inherit that: give Ctrl-C back.
    proc = subprocess.Popen([sys.executable, "-m", "attnedit", "batch", str(spec), "--out", str(out)], env=ENV,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # noqa: PLW1509
    deadline = time.time() + 120
    while not list(out.glob("*.job.json")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 130 and "Traceback" not in err and err.strip().splitlines()[-1] == "attnedit: interrupted"
    done = {p.name.split(".")[0] for p in out.glob("*.job.json")}
    assert {p.name.split(".")[0] for p in out.glob("*.png")} == done and not list(out.glob(".*.tmp"))


def test_help_and_argument_errors_are_fast_and_import_no_torch():
    probe = ("import sys, time; t = time.perf_counter(); from attnedit.surfaces.cli import main\n"
             "for argv in (['--help'], ['generate', 'x', '--width', '0'], ['video', 'x', '--frames', '-1']):\n"
             "    try: main(argv)\n    except SystemExit: pass\n"
             "print(time.perf_counter() - t, [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules])")
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", probe], env=ENV, capture_output=True, text=True, timeout=60)
    seconds, heavy = result.stdout.strip().splitlines()[-1].split(" ", 1)
    assert heavy == "[]" and float(seconds) < 1.0 and time.perf_counter() - started < 2.0, result.stdout
    assert "--width=0" in result.stderr and "--frames=-1" in result.stderr


def test_untested_diffusers_is_one_clear_import_error(monkeypatch):
    import diffusers

    from attnedit.core import versions

    versions.check_diffusers("0.42.7")
    for version in ("0.41.9", "0.43.0.dev0", "1.0.0", "garbage"):
        with pytest.raises(ImportError, match=f"needs diffusers>=0.42,<0.43.*diffusers {version} is installed"):
            versions.check_diffusers(version)
    monkeypatch.setattr(diffusers, "__version__", "0.44.0")
    with pytest.raises(ImportError, match="diffusers 0.44.0 is installed"):
        versions.check_diffusers()
    monkeypatch.setenv("ATTNEDIT_ALLOW_UNTESTED_DIFFUSERS", "1")
    with pytest.warns(UserWarning, match="continuing untested"):
        versions.check_diffusers()
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert f'"{versions.SUPPORTED_TEXT}",' in pyproject  # the pin and the check say the same


def test_the_check_runs_before_diffusers_internals_are_imported(monkeypatch):
    import importlib

    import diffusers

    from attnedit.core import versions

    monkeypatch.setattr(diffusers, "__version__", "0.99.0")
    with pytest.raises(ImportError, match="diffusers 0.99.0 is installed"):
        importlib.reload(versions)  # what importing attnedit.processors or attnedit.core.parallel runs first
    monkeypatch.undo()
    importlib.reload(versions)
    root = Path(__file__).parents[1] / "attnedit"
    for module in ("processors/projections.py", "core/parallel.py"):
        lines = (root / module).read_text().splitlines()
        first_diffusers = next(i for i, line in enumerate(lines) if line.startswith("from diffusers"))
        assert "import attnedit.core.versions" in "\n".join(lines[:first_diffusers]), module


def test_ctrl_c_swallowed_by_a_finalizer_still_stops_the_batch(monkeypatch):
    """Python ignores a KeyboardInterrupt raised inside ``__del__``; the batch must stop at its next job anyway."""
    import os
    import signal

    from attnedit.surfaces.interrupts import catching_interrupts, stop_if_interrupted

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # CI may start pytest with SIGINT ignored
    try:
        with catching_interrupts():
            class Finalized:
                def __del__(self):
                    os.kill(os.getpid(), signal.SIGINT)

            Finalized()  # collected at once; the interrupt is raised inside __del__ and printed as "ignored"
            with pytest.raises(KeyboardInterrupt):
                stop_if_interrupted()
        stop_if_interrupted()  # the request ends with the block
    finally:
        signal.signal(signal.SIGINT, previous)
