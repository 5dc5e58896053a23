"""The package's architecture, checked from its source: layers, no cycles, registries as truth.

Imports are read with ``ast`` (nothing is executed), function-level and TYPE_CHECKING imports
included. The layers, bottom to top (a module may import its own layer and the ones below):

    0 base        distill_cli, config, console, rundir            usable by all
    1 data        distill_cli.data.*                              (never imports models)
    1 models      distill_cli.models.*, checkpoint                (never imports data)
    2 kd          distill_cli.kd.*
    3 evaluation  distill_cli.evaluation.*
    4 stages      stages, stagefolder, training, runtime, distributed, trackers, eval_stage
    5 cli         cli, __main__
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "distill_cli"

# (rank, group) per layer; imports go to a lower rank, or stay within the same group.
LAYERS = {
    "base": (0, "base"),
    "data": (1, "data"),
    "models": (1, "models"),
    "kd": (2, "kd"),
    "evaluation": (3, "evaluation"),
    "stages": (4, "stages"),
    "cli": (5, "cli"),
}
TOP_LEVEL = {
    "distill_cli": "base",
    "distill_cli.config": "base",
    "distill_cli.console": "base",
    "distill_cli.rundir": "base",
    "distill_cli.checkpoint": "models",
    "distill_cli.stages": "stages",
    "distill_cli.stagefolder": "stages",
    "distill_cli.training": "stages",
    "distill_cli.selection": "stages",
    "distill_cli.search": "stages",
    "distill_cli.runtime": "stages",
    "distill_cli.distributed": "stages",
    "distill_cli.trackers": "stages",
    "distill_cli.eval_stage": "stages",
    "distill_cli.cli": "cli",
    "distill_cli.__main__": "cli",
}
SUBPACKAGES = ("data", "models", "kd", "evaluation")


def _modules() -> dict[str, Path]:
    """Every module of the package by dotted name."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The package's modules that ``name`` imports anywhere in its source."""
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                pkg = name.split(".") if is_package else name.split(".")[:-1]
                pkg = pkg[: len(pkg) - node.level + 1]
                base = ".".join([*pkg, base] if base else pkg)
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        out |= {t for t in targets if t in MODULES}
    return out - {name}


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _layer(name: str) -> str:
    parts = name.split(".")
    if len(parts) > 1 and parts[1] in SUBPACKAGES:
        return parts[1]
    if name not in TOP_LEVEL:
        pytest.fail(f"{name} belongs to no layer: add it to TOP_LEVEL in tests/test_layout.py")
    return TOP_LEVEL[name]


def test_every_module_has_a_layer():
    for name in MODULES:
        assert _layer(name) in LAYERS


def test_no_upward_or_sideways_import():
    wrong = []
    for name, targets in GRAPH.items():
        rank, group = LAYERS[_layer(name)]
        for target in targets:
            t_rank, t_group = LAYERS[_layer(target)]
            if t_rank > rank or (t_rank == rank and t_group != group):
                wrong.append(f"{name} ({group}) imports {target} ({t_group})")
    assert not wrong, "imports against the layers:\n" + "\n".join(sorted(wrong))


def test_no_import_cycle():
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(name: str) -> list[str] | None:
        state[name] = 1
        path.append(name)
        for target in sorted(GRAPH[name]):
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[name] = 2
        return None

    for name in sorted(GRAPH):
        if name not in state:
            cycle = visit(name)
            assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_subpackages_import_and_state_their_job():
    code = "import distill_cli.data, distill_cli.models, distill_cli.kd, distill_cli.evaluation"
    subprocess.run([sys.executable, "-c", code], check=True)
    for sub in SUBPACKAGES:
        doc = ast.get_docstring(ast.parse((PACKAGE / sub / "__init__.py").read_text()))
        assert doc and "distill-cli" in doc, f"distill_cli/{sub}/__init__.py needs a docstring"


def test_data_does_not_load_the_models():
    code = (
        "import sys, distill_cli.data; "
        "print(sorted(m for m in sys.modules if m.startswith('distill_cli.models')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_rundir_imports_no_torch():
    code = "import sys, distill_cli.rundir; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_manifest_path_built_in_rundir_only():
    """The literal file name appears in code (not docstrings) of rundir alone."""
    holders = set()
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text())
        docstrings = {
            id(n.body[0].value)
            for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
            and n.body
            and isinstance(n.body[0], ast.Expr)
            and isinstance(n.body[0].value, ast.Constant)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and id(node) not in docstrings:
                if isinstance(node.value, str) and "manifest.json" in node.value:
                    if "'" not in node.value and " " not in node.value:  # not a message text
                        holders.add(name)
    assert holders == {"distill_cli.rundir"}


def test_config_names_match_the_registries():
    from distill_cli import config
    from distill_cli.data import DATASETS
    from distill_cli.kd.features import FEATURE_METHODS
    from distill_cli.kd.losses import LOGIT_METHODS
    from distill_cli.kd.teacher_prep import PRECISIONS, PREPS
    from distill_cli.models import MODELS, TORCHVISION_MODELS

    assert set(config.MODELS) == set(MODELS)
    assert set(config.TORCHVISION_MODELS) == set(TORCHVISION_MODELS)
    assert set(config.DATASETS) == set(DATASETS)
    assert set(config.LOGIT_METHODS) == set(LOGIT_METHODS)
    assert set(config.KD_METHODS) == set(LOGIT_METHODS) | set(FEATURE_METHODS)
    assert not set(LOGIT_METHODS) & set(FEATURE_METHODS)
    # auto is settled into one of PRECISIONS before the teacher is prepared
    assert config.TEACHER_PREPS == PREPS and config.TEACHER_PRECISIONS == (*PRECISIONS, "auto")


def test_config_groups_match_the_registries():
    """Each registered name has its YAML file in conf/, and each YAML file a registered name."""
    from distill_cli import config

    groups = (("model", config.MODELS), ("kd", config.KD_METHODS), ("dataset", config.DATASETS))
    for group, names in groups:
        files = {p.stem for p in (ROOT / "conf" / group).glob("*.yaml")}
        assert set(names) <= files, f"conf/{group}/ lacks {set(names) - files}"


def test_wheel_lists_every_package():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    packages = {".".join(p.parent.relative_to(ROOT).parts) for p in PACKAGE.rglob("__init__.py")}
    assert packages <= listed
