"""The README's commands are real: every `shrink X` it shows is a command, every flag an option."""

import re
from pathlib import Path

import click
import typer

from shrink.cli.app import app

README = (Path(__file__).parent.parent / "README.md").read_text()


def _commands() -> dict[str, click.Command]:
    group = typer.main.get_command(app)
    commands = dict(group.commands)
    for name, command in group.commands.items():
        if hasattr(command, "commands"):  # a group (typer vendors its own click: not always a click.Group)
            commands.update({f"{name} {sub}": c for sub, c in command.commands.items()})
    return commands


def test_every_shrink_command_in_the_readme_exists_with_its_flags():
    commands = _commands()
    lines = [line for line in README.splitlines() if re.match(r"^\$ shrink |.*&& shrink |.*run: shrink ", line)]
    assert len(lines) >= 8
    for line in lines:
        words = line[line.index("shrink ") + len("shrink "):].split("#")[0].split()
        name = " ".join(words[:2]) if " ".join(words[:2]) in commands else words[0]
        assert name in commands, line
        options = {opt for param in commands[name].params for opt in getattr(param, "opts", [])}
        for flag in (w for w in words if w.startswith("-")):
            assert flag in options, f"{flag} in: {line}"


def test_readme_gives_the_two_setup_commands_and_ci_uses_the_test_one():
    assert "pip install torch==2.13.0 && pip install -e . && shrink run gemma-3-270m --recipe demo --target jetson-orin-nano --budget 6ms" in README
    test_command = 'pip install torch==2.13.0 && pip install -e ".[test]" && python -m pytest'
    assert test_command in README
    ci = (Path(__file__).parent.parent / ".ci" / "run").read_text()
    assert 'pip install torch==2.13.0\npip install -e ".[test]"\n' in ci and "python -m pytest" in ci
