#!/usr/bin/env python3
"""Write the public API of one rclpy release, read from a local git clone, as JSON.

    git clone https://github.com/ros2/rclpy rclpy-src      # once, by hand; this script never downloads
    python scripts/extract_rclpy_api.py --git-dir rclpy-src --ref humble --out tests/data/humble_rclpy_api.json

It reads ``rclpy/rclpy/**/*.py`` at ``--ref`` with ``git show`` (no checkout needed, a bare clone
does) and records, without importing anything:

- ``modules``: for each module, its public top-level names and what each one is (the qualified name of
  the class or function it defines or re-exports; an alias of the C extension's ``_rclpy.X``
  becomes ``rclpy._rclpy.X``);
- ``classes``: for each class, its bases (qualified where they are rclpy classes), its public
  attributes (methods, properties, class-level assignments, nested classes, ``self.x = ...`` in any
  method) and, for each method, its parameter names and whether it takes ``**kwargs``;
- ``functions``: the same signature record for module-level functions;
- the enums the C extension defines with pybind11 ``py::enum_`` (``src/rclpy/*.cpp``), as classes.

``tests/test_ros_distro_api.py`` checks the ROS nodes against this file.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

PACKAGE_DIR = "rclpy/rclpy"
CPP_DIR = "rclpy/src/rclpy"
EXTENSION = "rclpy._rclpy"
ENUM_RE = re.compile(r'py::enum_<[^>]+>\(\s*\w+,\s*"(\w+)"[^)]*\)(.*?);', re.S)
ENUM_VALUE_RE = re.compile(r'\.value\(\s*"(\w+)"')


def git(git_dir: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(git_dir), *args], check=True, capture_output=True, text=True).stdout


def module_name(path: str) -> str:
    parts = path[len("rclpy/"):-len(".py")].split("/")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def public(name: str) -> bool:
    return not name.startswith("_")


def signature(fn: ast.FunctionDef | ast.AsyncFunctionDef, method: bool) -> dict[str, Any]:
    a = fn.args
    names = [p.arg for p in (*a.posonlyargs, *a.args, *a.kwonlyargs)]
    if method and names and not any(isinstance(d, ast.Name) and d.id == "staticmethod" for d in fn.decorator_list):
        names = names[1:]  # self / cls
    return {"params": names, "varargs": a.vararg is not None, "varkw": a.kwarg is not None,
            "returns": ast.unparse(fn.returns) if fn.returns is not None else None}


class ModuleReader:
    """Names of one module; imports resolved against the package's own module names."""

    def __init__(self, name: str, is_package: bool, tree: ast.Module) -> None:
        self.name, self.is_package, self.tree = name, is_package, tree
        self.names: dict[str, str] = {}
        self.classes: dict[str, dict[str, Any]] = {}
        self.functions: dict[str, dict[str, Any]] = {}
        self.extension_aliases: set[str] = set()

    def absolute(self, node: ast.ImportFrom) -> str:
        if node.level == 0:
            return node.module or ""
        base = self.name.split(".")
        base = base if self.is_package else base[:-1]
        base = base[:len(base) - (node.level - 1)]
        return ".".join([*base, *([node.module] if node.module else [])])

    def read(self) -> None:
        for node in self.tree.body:
            self.read_statement(node)

    def read_statement(self, node: ast.stmt) -> None:
        if isinstance(node, ast.ImportFrom):
            source = self.absolute(node)
            for alias in node.names:
                local = alias.asname or alias.name
                if alias.name == "rclpy_implementation" and source.endswith("implementation_singleton"):
                    self.extension_aliases.add(local)
                self.names[local] = f"{source}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                self.names[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname else \
                    alias.name.split(".")[0]
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            self.names[node.name] = f"{self.name}.{node.name}"
            self.functions[f"{self.name}.{node.name}"] = signature(node, method=False)
        elif isinstance(node, ast.ClassDef):
            self.read_class(node, f"{self.name}.{node.name}")
            self.names[node.name] = f"{self.name}.{node.name}"
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            value = node.value
            for target in targets:
                if isinstance(target, ast.Name):
                    self.names[target.id] = self.assigned(value, target.id)
        elif isinstance(node, (ast.If, ast.Try)):
            for child in (*node.body, *getattr(node, "orelse", []), *getattr(node, "finalbody", []),
                          *(s for h in getattr(node, "handlers", []) for s in h.body)):
                self.read_statement(child)

    def assigned(self, value: ast.expr | None, target: str) -> str:
        """``X = _rclpy.Y`` -> ``rclpy._rclpy.Y``; ``X = Name`` -> what Name is; otherwise this module's X."""
        if isinstance(value, ast.Attribute) and isinstance(value.value, ast.Name) \
                and value.value.id in self.extension_aliases:
            return f"{EXTENSION}.{value.attr}"
        if isinstance(value, ast.Name) and value.id in self.names:
            return self.names[value.id]
        return f"{self.name}.{target}"

    def read_class(self, node: ast.ClassDef, qualname: str) -> None:
        attributes: set[str] = set()
        methods: dict[str, dict[str, Any]] = {}
        for item in node.body:
            if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                attributes.add(item.name)
                methods[item.name] = signature(item, method=True)
                for sub in ast.walk(item):
                    if isinstance(sub, ast.Attribute) and isinstance(sub.ctx, ast.Store) \
                            and isinstance(sub.value, ast.Name) and sub.value.id == "self":
                        attributes.add(sub.attr)
            elif isinstance(item, ast.ClassDef):
                attributes.add(item.name)
                self.read_class(item, f"{qualname}.{item.name}")
            elif isinstance(item, ast.Assign):
                attributes.update(t.id for t in item.targets if isinstance(t, ast.Name))
            elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                attributes.add(item.target.id)
        self.classes[qualname] = {
            "bases": [ast.unparse(b) for b in node.bases],
            "attributes": sorted(a for a in attributes if public(a) or a in ("__init__", "__call__")),
            "methods": {k: v for k, v in sorted(methods.items()) if public(k) or k in ("__init__", "__call__")},
        }


def qualify(reader: ModuleReader, name: str) -> str:
    """``Node`` -> ``rclpy.node.Node`` in a module that imports it; ``'Time'`` (a string annotation) too."""
    name = name.strip("'\"")
    if not re.fullmatch(r"[\w.]+", name):
        return name  # List[...], Optional[...]: kept as written
    head, _, tail = name.partition(".")
    return reader.names.get(head, name) + (f".{tail}" if tail else "")


def resolve_names(readers: dict[str, ModuleReader]) -> None:
    """Bases and simple return annotations written as local names become qualified names."""
    for reader in readers.values():
        for cls in reader.classes.values():
            cls["bases"] = [qualify(reader, b) for b in cls["bases"]]
            for sig in cls["methods"].values():
                if sig["returns"] is not None:
                    sig["returns"] = qualify(reader, sig["returns"])
        for sig in reader.functions.values():
            if sig["returns"] is not None:
                sig["returns"] = qualify(reader, sig["returns"])


def extension_enums(git_dir: Path, ref: str) -> dict[str, dict[str, Any]]:
    enums: dict[str, dict[str, Any]] = {}
    for path in git(git_dir, "ls-tree", "-r", "--name-only", ref, CPP_DIR).split():
        if path.endswith(".cpp"):
            for match in ENUM_RE.finditer(git(git_dir, "show", f"{ref}:{path}")):
                enums[f"{EXTENSION}.{match.group(1)}"] = {
                    "bases": ["enum"], "attributes": sorted(ENUM_VALUE_RE.findall(match.group(2))), "methods": {}}
    return enums


def extract(git_dir: Path, ref: str) -> dict[str, Any]:
    commit = git(git_dir, "rev-parse", f"{ref}^{{commit}}").strip()
    date = git(git_dir, "log", "-1", "--format=%cI", commit).strip()
    package_xml = git(git_dir, "show", f"{commit}:rclpy/package.xml")
    version = re.search(r"<version>([^<]+)</version>", package_xml)
    readers: dict[str, ModuleReader] = {}
    for path in sorted(git(git_dir, "ls-tree", "-r", "--name-only", commit, PACKAGE_DIR).split()):
        if path.endswith(".py"):
            reader = ModuleReader(module_name(path), path.endswith("__init__.py"),
                                  ast.parse(git(git_dir, "show", f"{commit}:{path}"), filename=path))
            reader.read()
            readers[reader.name] = reader
    resolve_names(readers)
    classes: dict[str, Any] = extension_enums(git_dir, commit)
    functions: dict[str, Any] = {}
    for reader in readers.values():
        classes.update(reader.classes)
        functions.update(reader.functions)
    return {
        "source": {"repository": "https://github.com/ros2/rclpy", "ref": ref, "commit": commit,
                   "commit_date": date, "rclpy_version": version.group(1) if version else None,
                   "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
                   "generator": "scripts/extract_rclpy_api.py"},
        "modules": {name: {k: v for k, v in sorted(r.names.items()) if public(k)}
                    for name, r in sorted(readers.items())},
        "classes": dict(sorted(classes.items())),
        "functions": dict(sorted(functions.items())),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--git-dir", type=Path, required=True, help="a local clone of github.com/ros2/rclpy")
    parser.add_argument("--ref", default="humble", help="branch, tag or commit (default: humble)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    api = extract(args.git_dir, args.ref)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(api, indent=1, sort_keys=False) + "\n")
    tmp.replace(args.out)
    print(f"{args.out}: rclpy {api['source']['rclpy_version']} at {api['source']['commit'][:12]}, "
          f"{len(api['modules'])} modules, {len(api['classes'])} classes, {len(api['functions'])} functions")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
