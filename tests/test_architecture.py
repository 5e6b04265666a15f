"""The layers of docs/architecture.md, checked: a module imports only modules of its own layer or
of the layers below (module-level imports; `if TYPE_CHECKING:` blocks are types only)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "keras_ee"

# Top to bottom, as the picture in docs/architecture.md.
LAYERS = [
    {"cli", "__main__"},
    {"experiment", "inference", "inputs", "interop"},
    {"distribute", "callbacks", "evaluation"},
    {"runs", "run_folder"},
    {"training"},
    {
        "models",
        "data",
        "optimizers",
        "schedules",
        "costs",
        "dumps",
        "calibration",
        "_native",
        "inference_snapshot",
        "plots",
        "formatting",
    },
    {"config", "validation", "registry", "atomic", "quiet", "_typing", "__init__"},
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}


def _top(module: str) -> str:
    """`keras_ee.training.l2w` -> `training`; a file's own top-level name likewise."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in tree.body:  # module level only: a function-local import is an explained exception
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "keras_ee":
            if node.module == "keras_ee":
                found |= {alias.name for alias in node.names}
            else:
                found.add(_top(node.module))
        elif isinstance(node, ast.Import):
            found |= {_top(a.name) for a in node.names if a.name.startswith("keras_ee.")}
    return found


def _upward_imports() -> list[str]:
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        owner = relative.parts[0] if len(relative.parts) > 1 else relative.stem
        if owner not in LAYER:
            bad.append(f"{relative}: not in any layer of docs/architecture.md")
            continue
        for imported in _imports(path):
            if imported not in LAYER:
                bad.append(f"{relative} imports {imported}, which is in no layer")
            elif LAYER[imported] < LAYER[owner]:
                bad.append(f"{relative} (layer {LAYER[owner]}) imports {imported} (layer {LAYER[imported]})")
    return bad


def test_every_import_points_down_the_layers_of_the_architecture_page():
    assert _upward_imports() == []


def test_the_check_sees_an_upward_import(tmp_path, monkeypatch):
    fake = tmp_path / "keras_ee"
    (fake / "models").mkdir(parents=True)
    (fake / "models" / "bad.py").write_text("from keras_ee import experiment\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    assert _upward_imports() == ["models/bad.py (layer 5) imports experiment (layer 1)"]


def test_the_page_draws_every_layer():
    page = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    for name in (
        "experiment.py",
        "runs.py",
        "run_folder.py",
        "distribute.py",
        "evaluation.py",
        "training/",
        "models/",
        "data/",
        "config.py",
        "validation.py",
        "registry.py",
        "plots.py",
        "formatting.py",
    ):
        assert name in page, name
