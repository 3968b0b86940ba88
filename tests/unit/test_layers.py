"""The layers of shared/ARCHITECTURE.md §2, checked: no module imports one above its own layer.

Every import of every module under meshctl/ and kernel/ is read with ast (function-level and
`if TYPE_CHECKING:` imports too, since each is a dependency of the module all the same) and
placed in a layer by LAYER_OF. A module may import its own layer or any layer below it.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Bottom to top.
LAYERS = ("kernel", "base", "features", "controller", "cli")

# Each package or module's layer, one line per entry: the longest entry that is a prefix of a
# module's dotted name decides ("meshctl" alone is meshctl/__init__.py). A module that matches
# no entry fails test_every_module_has_a_layer: a new package is given its layer here.
LAYER_OF = {
    "kernel": "kernel",
    "meshctl": "base",
    "meshctl.naming": "base",
    "meshctl.model": "base",
    "meshctl.view": "base",
    "meshctl.store": "base",
    "meshctl.ipam": "base",
    "meshctl.durations": "base",
    "meshctl.stats": "base",
    "meshctl.events": "base",
    "meshctl.sysctls": "base",
    "meshctl.reconcile": "base",
    "meshctl.keeper": "base",
    "meshctl.node": "features",
    "meshctl.overlay": "features",
    "meshctl.lb": "features",
    "meshctl.dns": "features",
    "meshctl.router": "features",
    "meshctl.runtime": "features",
    "meshctl.cluster": "features",
    "meshctl.commands": "features",
    "meshctl.controller": "controller",
    "meshctl.cli": "cli",
    "meshctl.__main__": "cli",
}

# Upward imports in the tree today, each "importer -> imported": the test reports them without
# failing, so that the lead sees them, and fails once one is gone (take it out of this set then).
# The lead empties this set as the redesign's branches merge.
KNOWN: set[str] = set()


@dataclass(frozen=True)
class Import:
    """One import statement's target in one module, where it is written."""

    module: str  # the importing module, dotted
    imported: str  # the module it imports, dotted
    line: int


def layer_of(module: str) -> str | None:
    """The layer of a dotted module name, by its longest prefix in LAYER_OF; None if none."""
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in LAYER_OF and (prefix != "meshctl" or end == len(parts)):
            return LAYER_OF[prefix]
    return None


def our_modules() -> dict[str, Path]:
    """Dotted name → file of every module under meshctl/ and kernel/."""
    found = {}
    for top in ("meshctl", "kernel"):
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> Iterator[Import]:
    """Every meshctl or kernel module that `module` imports, anywhere in its file.

    `from a import b` imports a.b when that is a module, else a; relative imports are resolved
    against the module's package.
    """
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                for alias in node.names
            ]
        else:
            continue
        for target in targets:
            if target.split(".")[0] in ("meshctl", "kernel"):
                yield Import(module, target, node.lineno)


def upward_imports() -> list[str]:
    """Each import of a module above the importer's layer, said in one line."""
    modules = our_modules()
    found = []
    for module, path in modules.items():
        for imp in imports_of(module, path, modules):
            have, want = layer_of(module), layer_of(imp.imported)
            if have is None or want is None:
                continue  # test_every_module_has_a_layer reports these
            if LAYERS.index(want) > LAYERS.index(have):
                found.append(
                    f"{module} -> {imp.imported}: {path.relative_to(ROOT)}:{imp.line} imports "
                    f"the {want} layer from the {have} layer"
                )
    return list(dict.fromkeys(found))  # two names from one module on one line: said once


def _pair(finding: str) -> str:
    return finding.partition(":")[0]


def test_every_module_has_a_layer() -> None:
    modules = our_modules()
    unplaced = sorted(m for m in modules if layer_of(m) is None)
    assert not unplaced, f"modules with no layer: {unplaced}; give each its line in LAYER_OF"
    assert set(LAYER_OF.values()) <= set(LAYERS)


def test_kernel_imports_nothing_from_meshctl() -> None:
    modules = our_modules()
    found = [
        f"{imp.module} imports {imp.imported} (line {imp.line})"
        for module, path in modules.items()
        if module.split(".")[0] == "kernel"
        for imp in imports_of(module, path, modules)
        if imp.imported.split(".")[0] == "meshctl"
    ]
    assert not found, "kernel/ must import nothing from meshctl:\n" + "\n".join(found)


def test_no_module_imports_a_layer_above_its_own() -> None:
    found = upward_imports()
    new = [line for line in found if _pair(line) not in KNOWN]
    gone = sorted(KNOWN - {_pair(line) for line in found})
    assert not new, "upward imports (bottom to top: " + " < ".join(LAYERS) + "):\n" + "\n".join(new)
    assert not gone, f"no longer imported, take these out of KNOWN: {gone}"


def test_the_walk_sees_function_level_and_relative_imports(tmp_path: Path) -> None:
    """The walker itself: an import inside a function, and a relative one, are both found."""
    source = tmp_path / "spec.py"
    source.write_text(
        "def f():\n    from meshctl.controller import daemon\n\nfrom ..store import changes\n"
    )
    modules = {"meshctl.controller.daemon": source, "meshctl.store.changes": source}
    found = {imp.imported for imp in imports_of("meshctl.lb.spec", source, modules)}
    assert found == {"meshctl.controller.daemon", "meshctl.store.changes"}


@pytest.mark.parametrize(
    ("module", "layer"),
    [
        ("kernel.fake.world", "kernel"),
        ("meshctl", "base"),
        ("meshctl.store.changes", "base"),
        ("meshctl.lb.spec", "features"),
        ("meshctl.controller.daemon", "controller"),
        ("meshctl.cli", "cli"),
        ("meshctl.cli.network", "cli"),
        ("meshctl.somethingnew", None),
    ],
)
def test_layer_of(module: str, layer: str | None) -> None:
    assert layer_of(module) == layer
