"""Run the code blocks of README.md and docs/*.md as a user would, in a fast mode (``tests/test_docs.py``).

A page's blocks run in order in one scratch folder (``configs/`` linked in), sharing state like a user
following the page: a ``fit`` leaves checkpoints that a later ``predict`` uses, a Python block's names are
seen by the next Python block. Nothing in a block is edited; the fast mode only *appends* trainer limits to
``fit|validate|test|predict`` commands and to the demo (:data:`FAST_TRAINER_ARGS`), and caps the
``Trainer`` built by a Python block (:func:`fast_trainer`).

What runs how is decided in one place, :data:`COMMANDS`: each shell program is either run in-process
(the CLI, the demo), checked (``pip install -e ".[x]"``: the extra exists), or not run here, with the
reason. A block that cannot run at all on this machine carries one marker on the line above its fence::

    <!-- docs: not-run gpu -->

with a reason from :data:`NOT_RUN_REASONS`. A shell command whose program is in neither table fails the
test: a new kind of command must be taught to the runner (or marked), not silently skipped.

Placeholders a reader fills in are listed in :data:`PLACEHOLDERS` (the best checkpoint of the page's
last ``fit``, ...); each is replaced by what the page's own earlier commands produced.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shlex
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest itself depends on tomli there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]

# Reasons a whole block may be marked not runnable here (the marker's word -> what the reader is told).
NOT_RUN_REASONS = {
    "gpu": "needs CUDA GPUs",
    "slurm": "needs a SLURM cluster",
    "multinode": "needs several machines",
    "download": "downloads a dataset or pretrained weights",
    "output": "shows output, not a command",
}

MARKER = re.compile(r"<!--\s*docs:\s*not-run\s+(\S+)\s*-->")
FENCE = re.compile(r"^(\s*)```(\S*)\s*$")

# Appended to every fit/validate/test/predict (the CLI and the demo): tiny runs, same code paths.
FAST_TRAINER_ARGS = [
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=1",
    "--trainer.limit_test_batches=1",
    "--trainer.limit_predict_batches=2",
    "--trainer.check_val_every_n_epoch=1",
    "--trainer.num_sanity_val_steps=0",
]
FAST_TRAINER_KWARGS = {
    "max_epochs": 1,
    "limit_train_batches": 2,
    "limit_val_batches": 1,
    "limit_test_batches": 1,
    "limit_predict_batches": 2,
    "num_sanity_val_steps": 0,
}


@dataclasses.dataclass
class Block:
    """One fenced code block of a page."""

    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    text: str
    not_run: str | None = None  # the marker's reason word

    @property
    def where(self) -> str:
        path = self.path.relative_to(ROOT) if self.path.is_relative_to(ROOT) else self.path
        return f"{path}:{self.line}"


def read_blocks(path: Path) -> list[Block]:
    """Every fenced block of a markdown file, with the ``not-run`` marker of the line above, if any."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        opened = FENCE.match(lines[i])
        if not opened:
            i += 1
            continue
        start, lang = i, opened.group(2).lower()
        body = []
        i += 1
        while i < len(lines) and not FENCE.match(lines[i]):
            body.append(lines[i])
            i += 1
        above = lines[start - 1] if start > 0 else ""
        marker = MARKER.search(above)
        blocks.append(Block(path, start + 1, lang, "\n".join(body) + "\n", marker.group(1) if marker else None))
        i += 1
    return blocks


def shell_lines(text: str) -> list[str]:
    """A shell block's logical lines: continuation lines joined."""
    return [line for line in re.sub(r"\\\n", " ", text).splitlines() if line.strip()]


def split_commands(line: str) -> list[list[str]]:
    """One logical line's commands: comments dropped, ``&&`` split."""
    commands, current = [], []
    for word in shlex.split(line, comments=True):
        if word == "&&":
            commands.append(current)
            current = []
        else:
            current.append(word)
    commands.append(current)
    return [c for c in commands if c]


def shell_commands(text: str) -> list[list[str]]:
    """The commands of a shell block: continuation lines joined, comments dropped, ``&&`` split."""
    return [command for line in shell_lines(text) for command in split_commands(line)]


@dataclasses.dataclass
class PageState:
    """What a page's earlier commands left behind (for its placeholders)."""

    workspace: Path
    best_checkpoint: str | None = None
    last_checkpoint: str | None = None
    namespace: dict[str, Any] = dataclasses.field(default_factory=dict)
    ran: list[str] = dataclasses.field(default_factory=list)
    not_run: list[str] = dataclasses.field(default_factory=list)


def _require(value: str | None, name: str) -> str:
    if not value:
        raise AssertionError(f"placeholder {name} used before any fit on this page produced it")
    return value


PLACEHOLDERS: dict[str, Callable[[PageState], str]] = {
    "<best checkpoint printed by fit>": lambda s: _require(s.best_checkpoint, "<best checkpoint printed by fit>"),
    "<last checkpoint printed by fit>": lambda s: _require(s.last_checkpoint, "<last checkpoint printed by fit>"),
}


def _fill(line: str, state: PageState) -> str:
    for key, value in PLACEHOLDERS.items():
        if key in line:
            line = line.replace(key, shlex.quote(value(state)))
    return line


def _record_checkpoints(cli: Any, state: PageState) -> None:
    trainer = getattr(cli, "trainer", None)
    if trainer is None:
        return
    from lightning.pytorch.callbacks import ModelCheckpoint

    for callback in trainer.callbacks:
        if isinstance(callback, ModelCheckpoint):
            if callback.best_model_path:
                state.best_checkpoint = callback.best_model_path
            if callback.last_model_path:
                state.last_checkpoint = callback.last_model_path


def run_cli(args: list[str], state: PageState) -> None:
    """``lightning-convnets <args>`` in-process, with the fast trainer limits for the Trainer commands."""
    from lightning_convnets.cli import ConvNetsCLI, main

    if args and args[0] in ("fit", "validate", "test", "predict"):
        cli = ConvNetsCLI(args=[*args, *FAST_TRAINER_ARGS])
        if args[0] == "fit":
            _record_checkpoints(cli, state)
    else:
        main(args)


def run_demo(args: list[str], state: PageState) -> None:
    """The demo in-process, each quickstart with the fast trainer limits."""
    from lightning_convnets import demo

    results = demo.main([*args, *FAST_TRAINER_ARGS])
    assert results, "the demo ran no quickstart"
    state.best_checkpoint = results[-1]["best_checkpoint"]


def _make(args: list[str], state: PageState) -> str | None:
    target = args[0] if args else ""
    variables = dict(a.split("=", 1) for a in args[1:] if "=" in a)
    if target == "demo":
        run_demo(["--task", variables.get("TASK", "all")], state)
        return None
    reasons = {
        "test": "is the test command CI itself runs (.ci/run)",
        "install": "is the install step CI itself runs (.ci/run)",
        "bench": "runs every benchmark (20-40 min); benchmarks have their own quick tests",
        "zoo": "runs the diagnosis zoo (minutes); tests/test_diagnosis.py covers its rules",
        "clean": "deletes the reader's logs",
        "docs": "builds the documentation site (CI runs it: .ci/run)",
    }
    if target not in reasons:
        raise AssertionError(f"make {target}: unknown target for the docs runner")
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(rf"^{re.escape(target)}:", makefile, re.M), f"the Makefile has no target {target!r}"
    return f"make {target} {reasons[target]}"


def _pip(args: list[str], state: PageState) -> str | None:
    assert args[:1] == ["install"], f"pip {' '.join(args)}: only `pip install` is documented"
    specs = [a for a in args[1:] if not a.startswith("-")]
    editable = "-e" in args or "--editable" in args
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for spec in specs:
        match = re.fullmatch(r"\.(?:\[([\w,-]+)\])?", spec)
        assert match and editable, (
            f"pip install {spec}: lightning-convnets is installed from a clone (`pip install -e \".[extra]\"`); "
            "a package name would need a published release"
        )
        for extra in filter(None, (match.group(1) or "").split(",")):
            assert extra in extras, f"pip install {spec}: pyproject.toml has no extra {extra!r}"
    return "pip install: checked that every extra exists; CI installs them (.ci/run)"


def _python(args: list[str], state: PageState) -> str | None:
    if args[:2] == ["-m", "venv"]:
        return "python -m venv: CI makes its own environment (.ci/run)"
    if args[:2] == ["-m", "lightning_convnets.demo"]:
        run_demo(args[2:], state)
        return None
    if args[:2] == ["-m", "lightning_convnets.cli"]:
        run_cli(args[2:], state)
        return None
    raise AssertionError(f"python {' '.join(args)}: unknown module for the docs runner")


# Every shell program a page may use: a handler returning None (ran) or why it did not run here.
COMMANDS: dict[str, Callable[[list[str], PageState], str | None]] = {
    "lightning-convnets": lambda a, s: run_cli(a, s),
    "python": _python,
    "make": _make,
    "pip": _pip,
    ".": lambda a, s: "activating a venv: CI uses .venv/bin directly",
    "source": lambda a, s: "activating a venv: CI uses .venv/bin directly",
    "pytest": lambda a, s: "pytest is the test command CI itself runs (.ci/run)",
    ".venv/bin/pytest": lambda a, s: "pytest is the test command CI itself runs (.ci/run)",
    "tensorboard": lambda a, s: "tensorboard starts a server that runs until stopped",
    "mkdocs": lambda a, s: "mkdocs: CI builds the site itself (.ci/run)",
}


def run_shell(block: Block, state: PageState) -> None:
    for line in shell_lines(block.text):  # line by line: a placeholder may name what the line before made
        for words in split_commands(_fill(line, state)):
            while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):  # VAR=value prefixes
                words = words[1:]
            program, args = words[0], words[1:]
            handler = COMMANDS.get(program)
            if handler is None:
                raise AssertionError(
                    f"{block.where}: `{program}` is not known to the docs runner (tests/docs_runner.py "
                    "COMMANDS); teach it, or mark the block <!-- docs: not-run <reason> -->"
                )
            why = handler(args, state)
            entry = f"{block.where}: {' '.join(words)}"
            (state.not_run if why else state.ran).append(entry + (f" ({why})" if why else ""))


@contextlib.contextmanager
def fast_trainer() -> Iterator[None]:
    """Cap every ``lightning.pytorch.Trainer`` built inside (a Python block's fit is a few batches)."""
    import lightning.pytorch as pl

    original = pl.Trainer.__init__

    def capped(self: Any, *args: Any, **kwargs: Any) -> None:
        kwargs.update(FAST_TRAINER_KWARGS)
        kwargs.setdefault("default_root_dir", os.getcwd())
        original(self, *args, **kwargs)

    pl.Trainer.__init__ = capped  # type: ignore[method-assign]
    try:
        yield
    finally:
        pl.Trainer.__init__ = original  # type: ignore[method-assign]


def run_python(block: Block, state: PageState) -> None:
    code = compile(block.text, block.where, "exec")
    with fast_trainer():
        exec(code, state.namespace)
    state.ran.append(f"{block.where}: python block")


def check_yaml(block: Block, state: PageState) -> None:
    """A YAML snippet parses, and every ``class_path`` in it imports with the ``init_args`` it names."""
    import importlib
    import inspect

    import yaml

    data = yaml.safe_load(block.text)

    def visit(node: Any) -> None:
        if isinstance(node, dict):
            if "class_path" in node:
                module, _, name = node["class_path"].rpartition(".")
                cls = getattr(importlib.import_module(module), name)
                params = inspect.signature(cls).parameters
                takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in params.values())
                for key in node.get("init_args") or {}:
                    assert key in params or takes_kwargs, f"{block.where}: {cls.__name__} takes no {key!r}"
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(data)
    state.ran.append(f"{block.where}: yaml checked")


def run_page(path: Path, workspace: Path) -> PageState:
    """Run every block of ``path`` in order inside ``workspace``; return what ran and what did not."""
    workspace.mkdir(parents=True, exist_ok=True)
    link = workspace / "configs"
    if not link.exists():
        link.symlink_to(ROOT / "configs", target_is_directory=True)
    state = PageState(workspace=workspace)
    state.namespace["__name__"] = "__docs__"
    before = os.getcwd()
    sys_path = list(sys.path)
    os.chdir(workspace)
    try:
        for block in read_blocks(path):
            if block.not_run is not None:
                if block.not_run not in NOT_RUN_REASONS:
                    raise AssertionError(
                        f"{block.where}: unknown not-run reason {block.not_run!r}; one of {sorted(NOT_RUN_REASONS)}"
                    )
                state.not_run.append(f"{block.where}: block ({NOT_RUN_REASONS[block.not_run]})")
            elif block.lang in ("bash", "sh", "shell"):
                run_shell(block, state)
            elif block.lang == "python":
                run_python(block, state)
            elif block.lang in ("yaml", "yml"):
                check_yaml(block, state)
            elif block.lang in ("", "text"):
                state.not_run.append(f"{block.where}: text block")
            else:
                raise AssertionError(f"{block.where}: a ```{block.lang} block: the docs runner knows no such language")
    finally:
        os.chdir(before)
        sys.path[:] = sys_path
    return state


def pages() -> list[Path]:
    """README.md and every page under docs/."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
