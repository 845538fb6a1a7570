"""The README's programs run as printed."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def python_blocks(section: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    start = text.index(f"## {section}")
    end = text.find("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", text[start : end if end > 0 else None], re.S)


def test_the_beep_layer_example_runs(tmp_path: Path) -> None:
    (block,) = python_blocks("Building on imxp: the BEEP layer")
    program = tmp_path / "example.py"
    program.write_text(block)
    run = subprocess.run(
        [sys.executable, str(program)],
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "b'HELLO'"


def _imxp_command_lines() -> list[str]:
    """The ``imxp`` command lines the README tells people to type: every one in its shell
    blocks, and the inline ones that carry an option (the rest only name a command)."""
    text = (ROOT / "README.md").read_text()
    lines: list[str] = []
    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            _, found, rest = line.partition(".venv/bin/imxp ")
            if found:
                lines.append(rest.rstrip(" &"))
    for span in re.findall(r"`imxp ([^`]*)`", text):
        if " -" in span:
            lines.append(span)
    return lines


def test_every_imxp_command_line_in_the_readme_is_accepted() -> None:
    """Each is parsed by the real argument parser, as the shell would split it; an option
    the command does not have, or a value it refuses, fails here rather than for a reader."""
    import shlex

    from imxp.cli import build_parser

    lines = _imxp_command_lines()
    # The walk-through's certificates, users, send and listen, and the inline route and check.
    assert len(lines) >= 12
    assert any(line.startswith("route ") for line in lines)
    parser = build_parser()
    for line in lines:
        try:
            parser.parse_args(shlex.split(line))
        except SystemExit:
            raise AssertionError(f"README: `imxp {line}` is refused by imxp") from None


def test_every_log_event_of_imxp_has_the_event_key_the_readme_promises() -> None:
    """README, Logs: a log processor picks events by their ``event`` key; one logged
    without it (a login, a crash) would escape every filter and alert written that way."""
    import ast

    unnamed = []
    for path in sorted((ROOT / "imxp").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("debug", "info", "warn", "error", "critical", "failure")
                and isinstance(logger := node.func.value, ast.Name | ast.Attribute)
                and (logger.id if isinstance(logger, ast.Name) else logger.attr) == "log"
                and not any(keyword.arg in ("event", None) for keyword in node.keywords)
            ):
                unnamed.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert unnamed == []
