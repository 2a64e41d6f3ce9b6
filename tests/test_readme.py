"""Every example in README.md runs as written: python and shell blocks on the built-in models, offline.

A block that names a hub model (``from_pretrained``, an ``org/name`` id, ``--model org/name``) cannot run here: its
python is compiled and its command lines are parsed by the CLI's own parser. The two set-up commands (after
``<!-- main -->`` and ``<!-- test -->``) are CI's own job and are skipped, as are ``pip``/``python``/``mkdocs`` lines.
"""

from __future__ import annotations

import os
import pathlib
import re
import shlex
import tokenize

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
HUB_ID = re.compile(r"""["'][A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*["']""")


def code_blocks(text: str) -> list[tuple[int, str, str]]:
    """(line number, language, code) of every fenced block not right after a set-up marker."""
    lines, blocks, k = text.split("\n"), [], 0
    while k < len(lines):
        match = re.match(r"^```(\w+)\s*$", lines[k])
        if match:
            start, body = k, []
            k += 1
            while not lines[k].startswith("```"):
                body.append(lines[k])
                k += 1
            marker = next((line for line in reversed(lines[:start]) if line.strip()), "")
            if marker.strip() not in ("<!-- main -->", "<!-- test -->"):
                blocks.append((start + 1, match.group(1), "\n".join(body)))
        k += 1
    return blocks


def command_lines(code: str) -> list[list[str]]:
    """The attnedit invocations of a shell block, as argv after ``attnedit`` (comments, continuations handled)."""
    out = []
    for line in code.replace("\\\n", " ").split("\n"):
        words = shlex.split(line, comments=True)
        if not words or words[0] in ("pip", "python", "mkdocs"):
            continue
        if "attnedit" not in words:
            raise AssertionError(f"README shell line is not an attnedit command: {line!r}")
        out.append(words[words.index("attnedit") + 1:])
    return out


def without_comments(code: str) -> str:
    """The code with its comments dropped: ``# or X.from_pretrained(...)`` in a comment does not make it a hub example."""
    tokens = tokenize.generate_tokens(iter(code.splitlines(keepends=True)).__next__)
    return tokenize.untokenize((t.type, t.string) for t in tokens if t.type != tokenize.COMMENT)


def names_hub_model(argv: list[str]) -> bool:
    model = argv[argv.index("--model") + 1] if "--model" in argv else ""
    return "/" in model and not pathlib.Path(model).exists()


BLOCKS = code_blocks(README.read_text())


def test_the_readme_has_examples_of_both_kinds():
    kinds = {language for _, language, _ in BLOCKS}
    assert {"python", "bash"} <= kinds, kinds


@pytest.mark.parametrize("line,language,code", BLOCKS, ids=[f"README.md:{n}" for n, _, _ in BLOCKS])
def test_readme_example_runs(line, language, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples write their outputs (clean.png, ...) into the current folder
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if language == "python":
        compiled = compile(code, f"README.md:{line}", "exec")
        bare = without_comments(code)
        if "from_pretrained" in bare or HUB_ID.search(bare):
            return  # a hub model: compiled only
        exec(compiled, {"__name__": "__readme__"})  # noqa: S102 - running the README as written is the point
    elif language in ("bash", "sh", "shell"):
        from attnedit.surfaces.cli import build_parser, main

        for argv in command_lines(code):
            if names_hub_model(argv):
                build_parser().parse_args(argv)  # arguments only: SystemExit(2) on a bad one
                continue
            assert main(argv) == 0, f"README.md:{line}: attnedit {shlex.join(argv)}"
            outputs = [argv[argv.index("--out") + 1]] if "--out" in argv else []
            assert all(os.path.exists(path) for path in outputs), (argv, os.listdir("."))
    elif language not in ("json", "yaml", "text"):
        raise AssertionError(f"README.md:{line}: a ```{language} block the test does not know how to check")
