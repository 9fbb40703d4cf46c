"""The shape of the code (issue 11): a library without import cycles, commands without sys.path edits,
imports inside functions only with a reason, and lint plus formatting as configured in pyproject.toml."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

LIBRARY = REPO / "fluxchat"
COMMANDS = [*sorted((REPO / "pipeline").glob("*.py")), *sorted((REPO / "tokenizer").glob("*.py")), REPO / "app.py"]
RUFF = Path(sys.executable).parent / "ruff"


def library_imports(path: Path) -> set[str]:
    """The fluxchat modules `path` imports, wherever the import statement sits (a function-level import is an edge too)."""
    modules = {p.stem for p in LIBRARY.glob("*.py")}
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "fluxchat":
                found |= {alias.name for alias in node.names if alias.name in modules}
            elif node.module.startswith("fluxchat."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {alias.name.split(".")[1] for alias in node.names if alias.name.startswith("fluxchat.")}
        elif isinstance(node, ast.ImportFrom) and node.level == 1:  # `from . import x` / `from .x import y`
            found |= {node.module.split(".")[0]} if node.module else {alias.name for alias in node.names}
    return found & modules


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, str] = {}  # "open" while on the DFS stack, "done" after

    def visit(node: str, stack: list[str]) -> list[str] | None:
        state[node] = "open"
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return stack[stack.index(target) :] + [target]
            if target not in state and (cycle := visit(target, [*stack, target])):
                return cycle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_library_has_no_import_cycle():
    graph = {path.stem: library_imports(path) - {path.stem} for path in LIBRARY.glob("*.py")}
    assert "runs" in graph["training"] and "config" in graph["runs"]  # the graph is really read from the source
    assert find_cycle(graph) is None, f"import cycle in fluxchat/: {' -> '.join(find_cycle(graph))}"
    # config is at the bottom: it imports only leaf modules (which import nothing of ours)
    assert all(not graph[leaf] for leaf in graph["config"]), (
        f"config.py imports {graph['config']}, which import more of ours"
    )


def test_no_library_module_imports_a_command():
    """The library sits under the commands: a `from pipeline import ...` in fluxchat/ would make a command's
    module (and its argument parsing) part of every other command."""
    commands = {"pipeline", "tokenizer", "app", "bench", "tests"}
    offenders = []
    for path in sorted(LIBRARY.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {name}" for name in names if name.split(".")[0] in commands]
    assert not offenders, offenders


def test_no_command_edits_sys_path():
    offenders = []
    for path in COMMANDS + sorted(LIBRARY.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Attribute)
                and node.attr == "path"
                and isinstance(node.value, ast.Name)
                and node.value.id == "sys"
            ):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not offenders, f"sys.path edited (the package is installed; see pyproject.toml): {offenders}"


def function_level_imports(path: Path) -> list[tuple[int, bool]]:
    """(line, has a comment saying why) for every import inside a function."""
    lines = path.read_text(encoding="utf-8").splitlines()
    found = {}
    for node in ast.walk(ast.parse("\n".join(lines))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for inner in ast.walk(node):
                if isinstance(inner, (ast.Import, ast.ImportFrom)):
                    above = inner.lineno - 2  # a group of imports shares the comment above its first line
                    while (
                        above >= 0
                        and lines[above].strip().startswith(("import ", "from "))
                        and "#" not in lines[above]
                    ):
                        above -= 1
                    said = (
                        "#" in lines[above]
                        if above >= 0 and lines[above].strip().startswith(("import ", "from ", "#"))
                        else False
                    )
                    found[inner.lineno] = "#" in lines[inner.lineno - 1] or said
    return sorted(found.items())


def test_imports_inside_functions_say_why():
    """Only for a real reason (a heavy or optional dependency), said in a comment on the line or the line above."""
    silent = [
        f"{path.relative_to(REPO)}:{line}"
        # bench/ is left out: its scripts import late on purpose (timing or measuring memory from a clean start)
        for folder in (LIBRARY, REPO / "pipeline", REPO / "tokenizer", REPO)  # REPO: app.py
        for path in sorted(folder.glob("*.py"))
        for line, has_reason in function_level_imports(path)
        if not has_reason
    ]
    assert not silent, f"imports inside functions without a comment saying why: {silent}"


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["ruff-check", "ruff-format"])
def test_ruff_passes_over_the_repo(command):
    if not RUFF.is_file():
        pytest.fail(f"{RUFF} is missing: install requirements-dev.txt (ruff is pinned there)")
    result = subprocess.run([str(RUFF), *command, "."], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_command_prints_its_help(command, capsys):
    """`--help` prints the usage and exits 0 (a `%` in one help string once turned it into an error)."""
    module = ".".join(command.relative_to(REPO).with_suffix("").parts)
    main = importlib.import_module(module).main
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage:"), out[:300]
    # The recipe flags are taken off before parsing, so no `--help` listed them; and no line says what
    # transformers' TrainingArguments means by run_name (its loggers' label) where ours is the output folder.
    if "options:" in out:  # a command with flags (pipeline/cards.py takes a folder only)
        assert "--config YAML" in out and "An optional descriptor for the run" not in out
