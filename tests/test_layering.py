"""The package's layering, read from the source: low-level packages never import higher ones, nothing imports the
package root, and there is no import cycle between parts (function-level imports included)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import moe_upcycle

ROOT = Path(moe_upcycle.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every moe_upcycle module ``path`` imports, at any depth of the file (``from . import x`` counts as ``x``)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "moe_upcycle"}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join([*base, *(node.module.split(".") if node.module else [])])
            if target.split(".")[0] != "moe_upcycle":
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                is_module = (ROOT.parent / Path(*sub.split("."))).with_suffix(".py").is_file() or \
                    (ROOT.parent / Path(*sub.split("."))).is_dir()
                found.add(sub if is_module else target)
    return found


MODULES = {_module_name(p): _imports(p) for p in ROOT.rglob("*.py")}


def _part(module: str) -> str:
    """``moe_upcycle.convert.plan`` -> ``convert``; top-level modules are their own part (``card``, ``cli``)."""
    return module.split(".")[1] if module.count(".") else "<root>"


def test_nothing_imports_the_package_root():
    offenders = {m: "moe_upcycle" for m, deps in MODULES.items() if "moe_upcycle" in deps}
    assert not offenders, f"import the defining module instead of the package root: {offenders}"


@pytest.mark.parametrize(("part", "allowed"), [
    ("checkpoint", {"checkpoint", "errors"}),
    ("modeling", {"modeling"}),  # the runtime files travel alone into trust_remote_code checkpoints
    ("adapters", {"adapters", "errors", "modeling"}),
    ("export", {"export", "checkpoint", "modeling", "errors", "card"}),
    ("card", {"checkpoint", "errors", "modeling"}),
    ("publish", {"checkpoint", "errors", "card", "train", "modeling"}),
])
def test_low_level_parts_import_only_below_them(part, allowed):
    used = {_part(dep) for m, deps in MODULES.items() if _part(m) == part for dep in deps}
    assert used <= allowed, f"{part} imports {sorted(used - allowed)}"


def test_train_and_export_do_not_reach_into_convert():
    offenders = sorted(f"{m} -> {d}" for m, deps in MODULES.items() if _part(m) in {"train", "export", "publish", "card"}
                       for d in deps if _part(d) == "convert")
    assert not offenders


def test_no_cycles_between_parts():
    graph: dict[str, set[str]] = {}
    for module, deps in MODULES.items():
        graph.setdefault(_part(module), set()).update(_part(d) for d in deps if _part(d) != _part(module))
    graph.pop("<root>", None)
    for deps in graph.values():
        deps.discard("<root>")

    def reach(start: str, node: str, seen: set[str]) -> bool:
        return any(dep == start or (dep not in seen and reach(start, dep, seen | {dep})) for dep in graph.get(node, ()))

    cyclic = sorted(p for p in graph if reach(p, p, {p}))
    assert not cyclic, {p: sorted(graph[p]) for p in cyclic}
