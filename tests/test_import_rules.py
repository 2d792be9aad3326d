"""The import direction between blockpilot's packages, checked statically (docs/architecture.md, "Import rules").

Every module under ``blockpilot/`` is parsed with :mod:`ast`; relative imports are resolved, and imports inside
functions count the same as those at the top of a file (a lazy import is still an arrow). The layering is the data
in :data:`MAY_IMPORT`; edges that break it today are listed, one module pair each, in :data:`KNOWN_EXCEPTIONS`
with the issue that removes them, so a new violation fails here and a fixed one must be struck off the list.

The torch-free rule is checked here statically, over the module-level import closure of every car-side module.
Three tests check it by really importing (and must stay): ``test_import_is_torch_free`` in test_export_bundle.py,
``test_planner_module_does_not_import_torch`` in test_planner.py and ``test_ort_planner_runs_without_importing_torch``
in test_export_onnx.py.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "blockpilot"

# Package (or top-level module) -> the blockpilot packages it may import. Lower layers first.
MAY_IMPORT: dict[str, frozenset[str]] = {
    "atomic_io": frozenset(),  # a leaf (standard library only) that every layer may import: see LEAVES
    "progress_bars": frozenset(),  # a leaf too (tqdm, optional)
    "geometry": frozenset(),  # a leaf (numpy only): ego frame, quaternions, poses
    "errors": frozenset(),  # a leaf: BlockpilotError, the root of every typed error
    "cli_common": frozenset(),  # a leaf (imports only the other leaves): the one-line user error, argument checks
    "vla": frozenset(),
    "kernels": frozenset({"vla"}),  # vla.modes: AttentionMode carries the mode ids the kernels take
    "formats": frozenset({"vla"}),
    "trt": frozenset({"formats", "kernels"}),
    "sim": frozenset({"formats"}),
    "train": frozenset({"vla", "sim"}),
    "runtime": frozenset({"vla", "formats", "kernels", "trt"}),
    "eval": frozenset({"vla", "formats", "sim", "runtime"}),
    "calibration": frozenset({"vla", "sim", "train", "eval", "runtime"}),
    "quant": frozenset({"vla", "sim", "eval", "runtime", "calibration"}),
    "export": frozenset({"vla", "formats", "kernels", "trt", "runtime", "eval", "calibration", "quant"}),
    "ros_nodes": frozenset({"vla", "runtime", "eval"}),
    "jetson": frozenset({"vla", "formats", "runtime", "eval", "quant", "export"}),
    "plan_cli": frozenset({"cli_common", "vla", "runtime"}),
    "demo": frozenset({"vla", "sim", "runtime", "eval", "export"}),
    "bench": frozenset({"vla", "sim", "runtime", "eval", "export", "ros_nodes"}),
    "cli": frozenset({"cli_common", "plan_cli", "demo", "vla", "formats", "train", "runtime", "eval", "calibration",
                      "quant", "export", "ros_nodes", "jetson", "bench"}),
}

# Leaf modules any module may import: they import nothing from blockpilot (MAY_IMPORT gives them nothing).
LEAVES = frozenset({"atomic_io", "progress_bars", "geometry", "errors", "cli_common"})

# House rules that hold whatever the table above says (ARCHITECTURE: the car needs none of these).
NEVER: dict[str, frozenset[str]] = {
    "runtime": frozenset({"export", "quant", "calibration", "sim", "train"}),
    "vla": frozenset({"runtime", "export", "quant", "calibration", "eval", "sim", "train"}),
    "formats": frozenset({"runtime", "export", "quant", "calibration", "kernels"}),
    "trt": frozenset({"runtime", "export"}),
}

# (importer, imported), each a module or a package prefix. Every entry is a violation today; remove it with the fix.
KNOWN_EXCEPTIONS: dict[tuple[str, str], str] = {
}

# Modules that may import torch at module level although their package may not.
TORCH_MODULES = frozenset({
    "blockpilot.runtime.torch_backend", "blockpilot.runtime.cuda_backend", "blockpilot.runtime.cuda_lm",
    "blockpilot.runtime.cuda_fp8", "blockpilot.runtime.cuda_graphs", "blockpilot.runtime.confidence",
    "blockpilot.runtime.published_generate",
})
# Packages whose modules must load without torch (the car's path, and every command's --help).
TORCH_FREE = ("formats", "trt", "runtime", "eval", "ros_nodes", "jetson", "cli", "cli_common", "plan_cli")

# Entry points: the only modules that may import another package's command-line module.
ENTRY_POINTS = ("cli", "plan_cli", "demo")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def _sources() -> dict[str, tuple[Path, ast.Module]]:
    return {_module_name(p): (p, ast.parse(p.read_text(encoding="utf-8"), str(p))) for p in sorted(ROOT.rglob("*.py"))}


def _ours(name: str) -> bool:
    return name == "blockpilot" or name.startswith("blockpilot.")


def _resolve(name: str) -> str:
    """The blockpilot module ``name`` loads: itself, or the module it names a member of."""
    while name not in _sources() and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def _targets(module: str, path: Path, node: ast.AST) -> list[str]:
    """Absolute names one import statement (or ``import_module("blockpilot...")`` call) reaches."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom):
        if node.level:
            package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            source = f"{base}.{node.module}" if node.module else base
        else:
            source = node.module or ""
        return [source, *(f"{source}.{a.name}" for a in node.names if f"{source}.{a.name}" in _sources())]
    if (isinstance(node, ast.Call) and isinstance(node.func, (ast.Name, ast.Attribute)) and node.args
            and (node.func.id if isinstance(node.func, ast.Name) else node.func.attr) == "import_module"
            and isinstance(node.args[0], ast.Constant) and _ours(str(node.args[0].value))):
        return [str(node.args[0].value)]
    return []


def _module_level(body: list[ast.stmt]) -> Iterator[ast.stmt]:
    """Statements run on import: into if/try/with/class bodies, not functions nor ``if TYPE_CHECKING``."""
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from _module_level(node.orelse)
            continue
        yield node
        for field in ("body", "orelse", "finalbody"):
            yield from _module_level(getattr(node, field, []))
        for handler in getattr(node, "handlers", []):
            yield from _module_level(handler.body)


@cache
def _edges(module_level: bool) -> dict[str, frozenset[str]]:
    """Module -> what it imports: blockpilot modules resolved, anything else by its top-level name."""
    out = {}
    for module, (path, tree) in _sources().items():
        nodes = _module_level(tree.body) if module_level else ast.walk(tree)
        found = set()
        for node in nodes:
            for target in _targets(module, path, node):
                found.add(_resolve(target) if _ours(target) else target.split(".")[0])
        out[module] = frozenset(found)
    return out


def _unit(module: str) -> str:
    return module.split(".")[1] if "." in module else module


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def _excepted(importer: str, imported: str) -> tuple[str, str] | None:
    return next((key for key in KNOWN_EXCEPTIONS if _within(importer, key[0]) and _within(imported, key[1])), None)


def _is_cli(module: str) -> bool:
    leaf = module.rsplit(".", 1)[-1]
    return leaf == "cli" or leaf.endswith("_cli")


def _violations() -> list[tuple[str, str, str]]:
    """(importer, imported, rule) for every blockpilot import that breaks a rule."""
    found = []
    for importer, targets in _edges(False).items():
        for imported in sorted(t for t in targets if t.startswith("blockpilot.")):
            src, dst = _unit(importer), _unit(imported)
            if src == dst:
                continue
            if dst not in MAY_IMPORT.get(src, frozenset()) and dst not in LEAVES:
                found.append((importer, imported, f"{src} may not import {dst}"))
            elif _is_cli(imported) and not _is_cli(importer) and _unit(importer) not in ENTRY_POINTS:
                found.append((importer, imported, "only entry points import another package's CLI module"))
    return found


def test_every_package_has_a_place_in_the_layering() -> None:
    units = {_unit(m) for m in _sources()} - {"blockpilot"}
    assert units == set(MAY_IMPORT), f"add to / remove from MAY_IMPORT: {sorted(units ^ set(MAY_IMPORT))}"
    assert all(deps <= set(MAY_IMPORT) for deps in MAY_IMPORT.values())


def test_the_layering_is_acyclic_and_keeps_the_house_rules() -> None:
    order: list[str] = []
    pending = dict(MAY_IMPORT)
    while pending:
        ready = sorted(u for u, deps in pending.items() if deps <= set(order))
        assert ready, f"MAY_IMPORT has a cycle among {sorted(pending)}"
        order += ready
        for unit in ready:
            del pending[unit]
    for unit, banned in NEVER.items():
        assert not MAY_IMPORT[unit] & banned, f"{unit} may never import {sorted(MAY_IMPORT[unit] & banned)}"


def test_imports_follow_the_layering() -> None:
    new = [f"{a} imports {b} ({rule})" for a, b, rule in _violations() if _excepted(a, b) is None]
    assert not new, "import against the layering (docs/architecture.md):\n" + "\n".join(new)


def test_every_known_exception_is_still_needed() -> None:
    used = {_excepted(a, b) for a, b, _ in _violations()}
    stale = [f"{key}: {why}" for key, why in KNOWN_EXCEPTIONS.items() if key not in used]
    assert not stale, "fixed; remove from KNOWN_EXCEPTIONS:\n" + "\n".join(stale)
    assert all(_resolve(name) in _sources() for key in KNOWN_EXCEPTIONS for name in key)


def test_car_side_modules_load_without_torch() -> None:
    edges = _edges(True)
    checked, offenders = 0, []
    for module in edges:
        if _unit(module) not in TORCH_FREE or module in TORCH_MODULES:
            continue
        checked += 1
        seen, stack, chain = set(), [module], {module: module}
        while stack:
            current = stack.pop()
            if current in seen:
                continue
            seen.add(current)
            parents = [current.rsplit(".", i)[0] for i in range(1, current.count(".") + 1)]
            for nxt in [*parents, *edges.get(current, ())]:
                if nxt == "torch":
                    offenders.append(f"{module}: torch at module level via {chain[current]}")
                elif nxt in edges and nxt not in chain:
                    chain[nxt] = f"{chain[current]} -> {nxt}"
                    stack.append(nxt)
    assert checked > 60
    assert not offenders, "\n".join(sorted(set(offenders)))
