"""The package's floors: every module imports only its own folder and the floors below it."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import mmcurate

PACKAGE = Path(mmcurate.__file__).resolve().parent

# Each folder (or top-level module) of the package and its floor; "" is the package root (__version__).
FLOORS = {
    **dict.fromkeys(("", "errors"), 0),  # what everything may raise
    **dict.fromkeys(("schemas", "options", "killpoints"), 1),  # the declared columns, option parsing, test kill points
    **dict.fromkeys(("stages", "shards"), 2),  # the stage abstraction; reading, writing and summarising shards
    **dict.fromkeys(("download", "filters", "dedup", "captioning", "exports"), 3),  # stage packages
    "pipelines": 4,  # YAML to stage objects
    **dict.fromkeys(("engines", "tooling", "loaders"), 5),  # run it; look at it, read it
    **dict.fromkeys(("cli", "jobs", "examples"), 6),  # entry points (they may call each other)
}
TOP = max(FLOORS.values())
DOTTED = re.compile(r"mmcurate(\.\w+)+(:\w+)?")  # a module (and class) named in a string, imported on first use


def _modules() -> list[Path]:
    """Every module the package ships: top-level modules and those of its folders (tests and bench are not shipped)."""
    folders = [p for p in PACKAGE.iterdir() if (p / "__init__.py").exists() and p.name != "tests"]
    return sorted([*PACKAGE.glob("*.py"), *(m for folder in folders for m in folder.rglob("*.py"))])


def _room(module: str) -> str:
    """The folder of a dotted ``mmcurate`` module name ("" for the package root)."""
    return module.split(".")[1] if "." in module else ""


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every mmcurate import in ``path``, at the top or inside functions (relative imports
    resolved), and of every string that names an mmcurate module to import later (``"mmcurate.x.y:Class"``)."""
    found = []
    package = ["mmcurate", *path.relative_to(PACKAGE).parent.parts]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and DOTTED.fullmatch(node.value):
            if _room(node.value) in FLOORS:  # "mmcurate.schema_version" names no module
                found.append((node.lineno, node.value.partition(":")[0]))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "mmcurate"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module
            if node.level:
                base = ".".join([*package[: len(package) - node.level + 1], *([node.module] if node.module else [])])
            if base == "mmcurate":  # from mmcurate import x: x is a folder or module, or a name of the root
                found += [(node.lineno, f"mmcurate.{a.name}" if a.name in FLOORS else "mmcurate") for a in node.names]
            elif base and base.split(".")[0] == "mmcurate":
                found.append((node.lineno, base))
    return found


def floor_violations() -> list[str]:
    problems = []
    for path in _modules():
        rel = path.relative_to(PACKAGE)
        room = rel.parts[0] if len(rel.parts) > 1 else ("" if rel.stem == "__init__" else rel.stem)
        if room not in FLOORS:
            problems.append(f"{rel}: folder {room!r} has no floor in tests/foundation/test_floors.py")
            continue
        for line, module in _imports(path):
            target = _room(module)
            if target not in FLOORS:
                problems.append(f"{rel}:{line} imports {module}, which has no floor")
            elif target != room and FLOORS[target] >= FLOORS[room] and not (FLOORS[room] == FLOORS[target] == TOP):
                problems.append(f"{rel}:{line} (floor {FLOORS[room]}) imports {module} (floor {FLOORS[target]})")
    return problems


def test_every_module_imports_only_the_floors_below() -> None:
    assert _modules() and len(_modules()) > 50  # the scan sees the package
    assert floor_violations() == []


def test_the_check_sees_an_import_up_or_sideways(tmp_path: Path, monkeypatch) -> None:
    """The check itself: tooling importing an engine (same floor), shards importing a pipeline (up) and the
    stage abstraction naming a stage package's class to import later are reported, inside a function too;
    a stage package importing the floors below is not."""
    fake = tmp_path / "mmcurate"
    for folder, text in {
        "tooling": "def f():\n    from mmcurate.engines.run import start_run\n",
        "shards": "from mmcurate import pipelines\n",
        "filters": "from mmcurate.stages.base import Stage\nfrom mmcurate.shards import layout\nfrom . import x\nimport mmcurate.errors\n",
        "stages": 'REGISTRY = {"download": "mmcurate.download.stage:Download"}\n',
        "engines": '"""Not mmcurate.engines.x: prose."""\nCOLUMN = "mmcurate.schema_version"\n',
    }.items():
        (fake / folder).mkdir(parents=True)
        (fake / folder / "__init__.py").write_text("")
        (fake / folder / "m.py").write_text(text)
    (fake / "__init__.py").write_text("")
    monkeypatch.setitem(globals(), "PACKAGE", fake)
    assert floor_violations() == [
        "shards/m.py:1 (floor 2) imports mmcurate.pipelines (floor 4)",
        "stages/m.py:1 (floor 2) imports mmcurate.download.stage (floor 3)",
        "tooling/m.py:2 (floor 5) imports mmcurate.engines.run (floor 5)",
    ]
