"""dvc.yaml is complete: a stage re-runs exactly when something it uses changes.

For every stage, derived from its script rather than trusted:
- each project module the script imports, directly or through other modules (including imports
  inside functions), is a dep, or lies in a folder that is;
- each params key the script reads (`params.train.lr`, or a whole section passed on) is declared;
- each path on its command line is a dep, an output or a metric.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
import yaml

from conftest import ROOT
from nslora.config import SECTIONS, Params

SRC = ROOT / "src"
PROJECT_PACKAGES = ("nslora", "nslora_cli")
# On the command line but deliberately not tracked: the teacher's reply cache outlives re-runs so
# that a forced or resumed run repeats no call (dvc.yaml says why).
UNTRACKED_PATHS = {".nslora/teacher_cache"}
# Folders a module uses by path rather than by import: the harness points lm-eval at the task
# YAML in tasks/, whose `!function utils.…` entries import tasks/utils.py.
USED_BY_PATH = {SRC / "nslora" / "evaluation" / "harness.py": SRC / "nslora" / "evaluation" / "tasks"}


def module_file(name: str) -> Path | None:
    parts = name.split(".")
    if parts[0] not in PROJECT_PACKAGES:
        return None
    base = SRC.joinpath(*parts)
    if (base / "__init__.py").exists():
        return base / "__init__.py"
    return base.with_suffix(".py") if base.with_suffix(".py").exists() else None


def package_of(file: Path) -> list[str]:
    if not file.is_relative_to(SRC):
        return []  # a stage script: absolute imports only
    parts = list(file.relative_to(SRC).with_suffix("").parts)
    return parts[:-1]  # the package a module (or an __init__) belongs to


def direct_imports(file: Path) -> set[Path]:
    """Project files `file` imports anywhere (module level or inside functions), with the
    __init__ of every package on the way (importing nslora.a.b runs nslora/__init__ and a/__init__)."""
    names = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = package_of(file)
                base = package[:len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names.add(module)
            names |= {f"{module}.{alias.name}" for alias in node.names}  # `from pkg import module`
    found = set()
    for name in names:
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            if (path := module_file(".".join(parts[:i]))) is not None:
                found.add(path)
    return found


def transitive_imports(script: Path) -> set[Path]:
    """Project files (and folders used by path) that running `script` executes or reads."""
    seen, todo = set(), [script]
    while todo:
        file = todo.pop()
        if file in seen:
            continue
        seen.add(file)
        if file.is_dir():
            todo.extend(file.glob("*.py"))
            continue
        todo.extend(direct_imports(file))
        if file in USED_BY_PATH:
            todo.append(USED_BY_PATH[file])
    return seen - {script}


TOP_LEVEL = {f.name for f in dataclasses.fields(Params)} - set(SECTIONS)
PROPERTIES = {"last_epoch": "epochs"}  # Params properties and the key they read


def _key(chain: list[str]) -> str | None:
    """The params key an attribute chain on a Params object reads: 'train.lr', or 'train' when the
    section itself is passed on (the callee may read any of its keys)."""
    if not chain:
        return None
    head = chain[0]
    if head in PROPERTIES:
        return PROPERTIES[head]
    if head in TOP_LEVEL:
        return head
    if head in SECTIONS:
        fields = {f.name for f in dataclasses.fields(SECTIONS[head])}
        return f"{head}.{chain[1]}" if len(chain) > 1 and chain[1] in fields else head
    raise AssertionError(f"params.{'.'.join(chain)}: not a params key")


def _chain(node: ast.AST, parents: dict) -> list[str]:
    """Attribute names read after `node`: for `params.train.lr`, starting at `params`, ['train', 'lr']."""
    names = []
    while isinstance(parents.get(node), ast.Attribute) and parents[node].value is node:
        node = parents[node]
        names.append(node.attr)
    return names


def params_keys_read(script: Path) -> set[str]:
    """Keys read from the Params that `load_params(...)` returns, through a name bound to it or to
    one of its sections (`model = load_params(p).model`), or directly on the call."""
    tree = ast.parse(script.read_text())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    keys: set[str] = set()
    bound: dict[str, list[str]] = {}  # variable -> the chain it holds (e.g. ['model'])
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "load_params":
            chain = _chain(node, parents)
            top = node
            for _ in chain:
                top = parents[top]
            target = parents.get(top)
            if isinstance(target, ast.Assign) and len(target.targets) == 1 and isinstance(target.targets[0], ast.Name):
                bound[target.targets[0].id] = chain  # its uses say what is read
            elif (key := _key(chain)) is not None:
                keys.add(key)
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id in bound and isinstance(node.ctx, ast.Load):
            chain = bound[node.id] + _chain(node, parents)
            if (key := _key(chain)) is not None:
                keys.add(key)
    return keys


def stages() -> list[tuple[str, dict]]:
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    return [(name, stage.get("do", stage)) for name, stage in dvc["stages"].items()]


def _paths(entries: list) -> list[str]:
    return [next(iter(e)) if isinstance(e, dict) else e for e in entries or []]


def covered(path: str, deps: list[str]) -> bool:
    return any(path == dep or path.startswith(dep.rstrip("/") + "/") for dep in deps)


def script_of(stage: dict) -> Path:
    return ROOT / next(word for word in stage["cmd"].split() if word.startswith("stages/"))


def missing_code_deps(stage: dict) -> list[str]:
    script = script_of(stage)
    deps = _paths(stage["deps"])
    needed = [str(script.relative_to(ROOT))] + sorted(str(f.relative_to(ROOT)) for f in transitive_imports(script))
    return [path for path in needed if not covered(path, deps)]


def missing_params(stage: dict) -> list[str]:
    declared = set()
    for entry in stage.get("params") or []:
        declared |= set(entry) if isinstance(entry, dict) else {entry}
    return sorted(key for key in params_keys_read(script_of(stage))
                  if key not in declared and key.split(".")[0] not in declared)


def untracked_paths_on_command_line(stage: dict) -> list[str]:
    known = _paths(stage.get("deps")) + _paths(stage.get("outs")) + _paths(stage.get("metrics"))
    words = stage["cmd"].split()
    paths = [w for w in words if "/" in w and not w.startswith("-") and w not in UNTRACKED_PATHS
             and w != "params.yaml"]
    return [p for p in paths if not covered(p, known)]


@pytest.mark.parametrize("name, stage", stages(), ids=[name for name, _ in stages()])
def test_stage_declares_the_code_params_and_files_it_uses(name, stage):
    assert not missing_code_deps(stage), f"stage {name}: deps miss {missing_code_deps(stage)}"
    assert not missing_params(stage), f"stage {name}: params miss {missing_params(stage)}"
    assert not untracked_paths_on_command_line(stage), \
        f"stage {name}: {untracked_paths_on_command_line(stage)} on its command line but not a dep or output"


def test_the_check_notices_each_missing_dep_and_key():
    # Deleting any one code dep, params entry or input path from any stage is caught.
    for name, stage in stages():
        for i, dep in enumerate(stage["deps"]):
            without = {**stage, "deps": stage["deps"][:i] + stage["deps"][i + 1:]}
            assert (missing_code_deps(without) or untracked_paths_on_command_line(without)), \
                f"stage {name}: dropping dep {dep} went unnoticed"
        for i, entry in enumerate(stage.get("params") or []):
            without = {**stage, "params": stage["params"][:i] + stage["params"][i + 1:]}
            assert missing_params(without), f"stage {name}: dropping params entry {entry} went unnoticed"


def test_import_and_params_analysis_on_a_known_script(tmp_path):
    script = tmp_path / "stage.py"
    script.write_text(
        "from nslora_cli.params_file import load_params\n"
        "def main(path):\n"
        "    from nslora.teacher import make_teacher\n"
        "    params = load_params(path)\n"
        "    make_teacher(params.teacher, params.train.lr)\n"
        "    model = load_params(path).model\n"
        "    print(model.name, params.last_epoch, load_params(path).data)\n")
    files = {str(f.relative_to(SRC)) for f in transitive_imports(script)}
    # make_teacher imports the engines inside a function; every package's __init__ on the way runs.
    assert {"nslora/teacher/__init__.py", "nslora/teacher/local_engine.py", "nslora/teacher/openai_engine.py",
            "nslora/teacher/base.py", "nslora/__init__.py", "nslora_cli/__init__.py",
            "nslora_cli/params_file.py", "nslora/config.py"} <= files
    assert params_keys_read(script) == {"teacher", "train.lr", "model.name", "epochs", "data"}
