"""Every code snippet of the README and the guides runs, so that an example that drifts from the
code fails here (issue 32).

- A `python` block runs, in document order with the page's other blocks, in one namespace per
  page, in a fresh folder that holds `runs/demo`, `runs/l2w` and `runs/baseline`: one tiny run
  on the built-in digits (the default 4-exit `multiexit_cnn`, one epoch on 300 images), since
  the guides' runs take a minute each. A block after `<!-- file: NAME -->` is written to NAME
  there (importable) instead of being run.
- A `sh` block's commands: `keras-ee ...` (or `python -m keras_ee ...`) is parsed by the real
  parser (`keras_ee.cli.build_parser`); `train` also builds its `TrainConfig` (every setting
  checked, nothing trained), and the cheap commands (`CHEAP`) run for real against the
  folder's runs unless they name a placeholder (`RUN`, `DIR`: the reader's own file).
  `python -m tuning.search` and `python bench/methods.py` are parsed by their own parsers,
  `python -c CODE` runs CODE, `make TARGET` needs the Makefile's target.
  Anything else is an error unless its block is marked `<!-- not run: REASON -->`, which only
  a snippet that needs data, software or hardware this machine lacks may carry.
- `text`, `toml` and `json` blocks are output or files shown, and `mermaid` a picture, not run; a block without a
  language is an error (a command must not hide from this test).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import re
import shlex
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from tiny_models import fresh_collective_keys

from keras_ee import cli

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md"] + sorted(
    p for p in (ROOT / "docs").rglob("*.md") if p.name != "benchmarks.md" and "gen" not in p.parts
)
LANGUAGES = {"python", "sh", "text", "toml", "json", "mermaid"}  # mermaid: a picture
# The subcommands that take seconds on the tiny runs; `train` is checked up to its TrainConfig.
# (`models` builds every preset: parsed only.)
CHEAP = {"methods", "datasets", "sweep", "compare", "predict"}
RUN_NAMES = ("demo", "l2w", "baseline")
# RUN, DUMP_FOLDER, CHECKPOINT.pth.tar: a placeholder for the reader's own file; such a command is only parsed.
ENV_ASSIGNMENT = re.compile(r"^[A-Z_][A-Z0-9_]*=")
PLACEHOLDER = re.compile(r"^[A-Z][A-Z_]{2,}(\.[\w.]+)?$")

FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.M | re.S)
MARK = re.compile(r"<!--\s*(not run|file):\s*(.*?)\s*-->\s*$")


@dataclass
class Block:
    page: Path
    line: int
    language: str
    code: str
    not_run: str | None = None
    file: str | None = None

    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    text = page.read_text(encoding="utf-8")
    out = []
    for m in FENCE.finditer(text):
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        block = Block(page, text.count("\n", 0, m.start()) + 1, m.group(1).strip(), m.group(2))
        mark = MARK.search(before)
        if mark and mark.group(1) == "not run":
            block.not_run = mark.group(2)
        elif mark:
            block.file = mark.group(2)
        out.append(block)
    return out


def test_every_page_has_its_blocks_found_and_each_a_known_language():
    found = {page: blocks(page) for page in PAGES}
    assert found[ROOT / "README.md"], "no code block found in README.md"
    bad = [
        f"{b.where()}: {b.language or 'no language'}"
        for bs in found.values()
        for b in bs
        if b.language not in LANGUAGES
    ]
    assert not bad, f"code blocks need one of {sorted(LANGUAGES)}: {bad}"
    unexplained = [b.where() for bs in found.values() for b in bs if b.not_run is not None and len(b.not_run) < 10]
    assert not unexplained, f"a snippet marked not run says why: {unexplained}"


@pytest.fixture(scope="session")
def trained_runs(tmp_path_factory):
    """One tiny finished run (what the guides' runs are, in miniature) for the snippets to use."""
    from keras_ee import experiment
    from keras_ee.config import TrainConfig

    root = tmp_path_factory.mktemp("docs_runs")
    config = TrainConfig(
        dataset="digits", model="multiexit_cnn", method="baseline", epochs=1, batch_size=128, train_size=300
    )
    experiment.train(config, root / "runs" / "demo", verbose=0)
    for name in RUN_NAMES[1:]:
        shutil.copytree(root / "runs" / "demo", root / "runs" / name)
    return root / "runs"


def commands(code: str) -> list[list[str]]:
    """The commands of a shell block as argv lists: continuations joined, comments and blanks dropped."""
    lines = code.replace("\\\n", " ").splitlines()
    return [argv for argv in (shlex.split(line, comments=True) for line in lines) if argv]


def parse(parser: argparse.ArgumentParser, argv: list[str], where: str) -> argparse.Namespace:
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return parser.parse_args(argv)
    except SystemExit:
        pytest.fail(f"{where}: {shlex.join(argv)} does not parse: {err.getvalue().strip()}")


def makefile_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    return set(re.findall(r"^([A-Za-z][\w-]*):", text, re.M))


def run_command(argv: list[str], block: Block) -> None:
    where = f"{block.where()}: `{shlex.join(argv)}`"
    while argv and ENV_ASSIGNMENT.match(argv[0]):  # `TF_ENABLE_ONEDNN_OPTS=1 keras-ee ...`: the command is checked
        argv = argv[1:]
    if argv[:1] == ["keras-ee"] or argv[:3] == ["python", "-m", "keras_ee"]:
        argv = argv[1:] if argv[0] == "keras-ee" else argv[3:]
        args = parse(cli.build_parser(), argv, where)
        if args.command == "train":
            cli._config_from_args(args)  # every setting checked as `train` checks it, nothing trained
        elif args.command in CHEAP and not any(PLACEHOLDER.match(a) for a in argv):
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                status = cli.main(argv)
            assert status == 0, f"{where} exited with status {status}"
    elif argv[:3] == ["python", "-m", "tuning.search"]:
        from tuning import search

        parse(search._parser(), argv[3:], where)
    elif argv[:2] == ["python", "bench/methods.py"]:
        spec = importlib.util.spec_from_file_location("bench_methods_for_docs", ROOT / "bench" / "methods.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        parse(module._parser(), argv[2:], where)
    elif argv[:2] == ["python", "-c"] and len(argv) == 3:
        exec(compile(argv[2], where, "exec"), {})
    elif argv[:1] == ["make"]:
        missing = set(argv[1:]) - makefile_targets()
        assert not missing, f"{where}: the Makefile has no target {sorted(missing)}"
    else:
        pytest.fail(
            f"{where}: not a command this test can check; mark its block <!-- not run: REASON --> if it must stay"
        )


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_the_snippets_of_a_page_run(page, trained_runs, tmp_path, monkeypatch, capsys):
    todo = [b for b in blocks(page) if b.language in {"python", "sh"} and b.not_run is None]
    if not todo:
        pytest.skip("no snippet to run")
    shutil.copytree(trained_runs, tmp_path / "runs")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    _isolate_method_registry(monkeypatch)
    fresh_collective_keys()  # a page's own MirroredStrategy, beside the ones this process's other tests made
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    files = [b.file for b in todo if b.file]
    try:
        for block in todo:
            if block.file:
                (tmp_path / block.file).write_text(block.code, encoding="utf-8")
            elif block.language == "python":
                exec(compile(block.code, block.where(), "exec"), namespace)
            else:
                for argv in commands(block.code):
                    run_command(argv, block)
    finally:
        for file in files:  # a module the page wrote is the page's alone
            sys.modules.pop(Path(file).stem, None)
    capsys.readouterr()


def _isolate_method_registry(monkeypatch):
    """A page that registers a method (the plug-in guide) leaves the registry as it found it."""
    from keras_ee.training import registry

    registry.list_methods()  # the package's own methods, registered before the copy
    monkeypatch.setattr(registry, "_METHODS", registry._METHODS.copy())
