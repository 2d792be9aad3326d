"""Static check of a module's rclpy use against one rclpy release's API list (``tests/data/*_rclpy_api.json``).

:func:`check_source` parses the code (nothing is imported) and reports every use it can attribute
that the release lacks:

- ``import rclpy.X`` / ``from rclpy.X import Y`` of a module or name the release does not have;
- ``rclpy.X``, ``rclpy.X.Y`` and ``Cls.ATTR`` (``HistoryPolicy.KEEP_LAST``, ``Parameter.Type.STRING_ARRAY``);
- attributes and methods of objects whose class it can tell: ``self`` in a class derived from an
  rclpy class (minus what the class defines itself), ``super()`` there, names assigned from a
  constructor call or annotated with a class, and what known methods return (``get_logger()``,
  ``get_clock().now()``, ``create_publisher(...)``, as annotated in the release's source);
- keyword arguments of calls to functions and methods it can resolve (``rclpy.init(signal_handler_options=...)``,
  ``create_subscription(..., raw=True)``), unless the callee takes ``**kwargs``.

Uses it cannot attribute (a value passed in without annotation) are not checked.
"""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DATA = Path(__file__).parent / "data"
ENUM_BASES = {"enum", "Enum", "IntEnum", "enum.Enum", "enum.IntEnum", "rclpy.qos.QoSPolicyEnum"}
ENUM_MEMBER_ATTRIBUTES = {"name", "value"}
# Methods whose Humble source has no return annotation.
UNANNOTATED_RETURNS = {"get_logger": "rclpy.impl.rcutils_logger.RcutilsLogger",
                       "create_lifecycle_publisher": "rclpy.lifecycle.publisher.LifecyclePublisher"}


def load_api(distro: str) -> dict[str, Any]:
    """``<distro>_rclpy_api.json`` with ``<distro>_ros_interfaces.json`` merged in: ``pkg.msg`` / ``pkg.srv``
    modules whose classes have the fields as attributes and constructor keywords."""
    api: dict[str, Any] = json.loads((DATA / f"{distro}_rclpy_api.json").read_text())
    api["label"] = f"{distro.capitalize()} (rclpy {api['source']['rclpy_version']})"
    interfaces = json.loads((DATA / f"{distro}_ros_interfaces.json").read_text())["interfaces"]
    for key, record in interfaces.items():
        package, kind, name = key.split("/")
        qualname = f"{package}.{kind}.{name}"
        api["modules"].setdefault(f"{package}.{kind}", {})[name] = qualname
        if kind == "msg":
            api["classes"][qualname] = message_class(record)
        else:
            api["classes"][qualname] = {"bases": [], "attributes": ["Request", "Response"], "methods": {}}
            for half in ("Request", "Response"):
                api["classes"][f"{qualname}.{half}"] = message_class(record[half.lower()])
    return api


def message_class(record: dict[str, Any]) -> dict[str, Any]:
    fields = record["fields"]
    types = {name: ftype.replace("/", ".msg.") for name, ftype in fields.items()
             if "/" in ftype and "[" not in ftype}  # a nested message (arrays are not followed)
    return {"bases": [], "attributes": sorted([*fields, *record["constants"]]), "field_types": types,
            "methods": {"__init__": {"params": list(fields), "varargs": False, "varkw": False, "returns": None}}}


@dataclass
class LocalClass:
    """A class of the checked module derived from an rclpy class."""
    base: str
    attributes: set[str]


@dataclass
class Checker(ast.NodeVisitor):
    api: dict[str, Any]
    path: str
    feature_checked: set[str] = field(default_factory=set)
    problems: list[str] = field(default_factory=list)
    names: dict[str, str] = field(default_factory=dict)  # local name -> qualified rclpy name
    local: dict[str, LocalClass] = field(default_factory=dict)
    scopes: list[dict[str, str]] = field(default_factory=lambda: [{}])  # variable -> class (rclpy or local)
    classes: list[str] = field(default_factory=list)  # enclosing classes
    parents: list[ast.AST] = field(default_factory=list)  # enclosing class and function definitions

    # ---- the API list ----------------------------------------------------------------------------

    def kind(self, qualname: str) -> str | None:
        if qualname in self.api["modules"]:
            return "module"
        if qualname in self.api["classes"]:
            return "class"
        if qualname in self.api["functions"]:
            return "function"
        return None

    def module_member(self, module: str, name: str) -> str | None:
        """The qualified name ``module.name`` stands for, or None when the release lacks it."""
        if f"{module}.{name}" in self.api["modules"]:
            return f"{module}.{name}"
        target = self.api["modules"].get(module, {}).get(name)
        return str(target) if target is not None else None

    def class_attributes(self, cls: str) -> set[str] | None:
        """Every attribute of an rclpy or local class, inherited ones included; None if a base is unknown."""
        if cls in self.local:
            inherited = self.class_attributes(self.local[cls].base)
            return None if inherited is None else inherited | self.local[cls].attributes
        record = self.api["classes"].get(cls)
        if record is None:
            return None
        attrs = set(record["attributes"])
        for base in record["bases"]:
            if base in ENUM_BASES:
                attrs |= ENUM_MEMBER_ATTRIBUTES
            elif base.startswith("rclpy."):
                inherited = self.class_attributes(base)
                if inherited is None:
                    return None
                attrs |= inherited
        return attrs

    def rclpy_class(self, cls: str) -> str:
        """The rclpy class a local class derives from (itself for an rclpy class)."""
        while cls in self.local:
            cls = self.local[cls].base
        return cls

    def method(self, cls: str, name: str) -> dict[str, Any] | None:
        """The signature record of ``cls.name`` (searched through the bases), None if unknown."""
        if cls in self.local:
            return None if name in self.local[cls].attributes else self.method(self.local[cls].base, name)
        record = self.api["classes"].get(cls)
        if record is None:
            return None
        if name in record["methods"]:
            sig: dict[str, Any] = record["methods"][name]
            return sig
        for base in record["bases"]:
            found = self.method(base, name)
            if found is not None:
                return found
        return None

    def report(self, node: ast.AST, message: str) -> None:
        self.problems.append(f"{self.path}:{getattr(node, 'lineno', '?')}: {message}")

    # ---- imports ---------------------------------------------------------------------------------

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if not self.checked_root(alias.name):
                continue
            if self.kind(alias.name) != "module":
                self.report(node, f"import {alias.name}: no such module in {self.version}")
            self.names[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname else \
                alias.name.split(".")[0]

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        module = node.module or ""
        if node.level or not self.checked_root(module):
            return
        if self.kind(module) != "module":
            self.report(node, f"from {module} import ...: no such module in {self.version}")
            return
        for alias in node.names:
            target = self.module_member(module, alias.name)
            if target is None:
                self.report(node, f"from {module} import {alias.name}: not in {self.version}")
            else:
                self.names[alias.asname or alias.name] = target

    @property
    def version(self) -> str:
        return str(self.api.get("label") or f"rclpy {self.api['source']['rclpy_version']}")

    def checked_root(self, module: str) -> bool:
        """rclpy and the interface packages are checked (an unknown ``*.msg`` / ``*.srv`` package too)."""
        root = module.split(".")[0]
        return root == "rclpy" or any(m.split(".")[0] == root for m in self.api["modules"]) \
            or module.endswith((".msg", ".srv"))

    # ---- classes and scopes ----------------------------------------------------------------------

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        bases = [self.type_of(b) for b in node.bases]
        base = next((b for b in bases if b is not None), None)
        if base is not None:
            attrs = {n.name for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
            for sub in ast.walk(node):
                if isinstance(sub, ast.Attribute) and isinstance(sub.ctx, ast.Store) \
                        and isinstance(sub.value, ast.Name) and sub.value.id == "self":
                    attrs.add(sub.attr)
                elif isinstance(sub, ast.Assign):
                    attrs.update(t.id for t in sub.targets if isinstance(t, ast.Name))
            self.local[node.name] = LocalClass(base, attrs)
        self.classes.append(node.name)
        self.parents.append(node)
        self.generic_visit(node)
        self.parents.pop()
        self.classes.pop()

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        scope: dict[str, str] = {}
        args = [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs]
        is_method = bool(self.parents) and isinstance(self.parents[-1], ast.ClassDef)
        if is_method and self.classes[-1] in self.local and args:
            scope[args[0].arg] = self.classes[-1]
        for arg in args:
            if arg.annotation is not None and (cls := self.annotation_class(arg.annotation)) is not None:
                scope[arg.arg] = cls
        self.scopes.append(scope)
        self.parents.append(node)
        self.generic_visit(node)
        self.parents.pop()
        self.scopes.pop()

    visit_AsyncFunctionDef = visit_FunctionDef

    def annotation_class(self, annotation: ast.expr) -> str | None:
        """``PlannerNode | None``, ``Optional[Node]``, ``'Node'`` -> the first class named."""
        if isinstance(annotation, ast.Constant) and isinstance(annotation.value, str):
            try:
                annotation = ast.parse(annotation.value, mode="eval").body
            except SyntaxError:
                return None
        for sub in ast.walk(annotation):
            if isinstance(sub, (ast.Name, ast.Attribute)) and (cls := self.type_of(sub)) is not None \
                    and (cls in self.local or self.kind(cls) == "class"):
                return cls
        return None

    def visit_Assign(self, node: ast.Assign) -> None:
        self.generic_visit(node)
        cls = self.instance_of(node.value)
        for target in node.targets:
            if isinstance(target, ast.Name) and cls is not None:
                self.scopes[-1][target.id] = cls

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        self.generic_visit(node)
        if isinstance(node.target, ast.Name):
            cls = self.annotation_class(node.annotation) or (self.instance_of(node.value) if node.value else None)
            if cls is not None:
                self.scopes[-1][node.target.id] = cls

    def visit_NamedExpr(self, node: ast.NamedExpr) -> None:
        self.generic_visit(node)
        if (cls := self.instance_of(node.value)) is not None:
            self.scopes[-1][node.target.id] = cls

    # ---- expressions -----------------------------------------------------------------------------

    def type_of(self, expr: ast.expr) -> str | None:
        """The rclpy module / class / function (or local class) an expression names, or the class of
        the object it evaluates to; None when unknown."""
        if isinstance(expr, ast.Name):
            for scope in reversed(self.scopes):
                if expr.id in scope:
                    return scope[expr.id]
            return self.names.get(expr.id) or (expr.id if expr.id in self.local else None)
        if isinstance(expr, ast.Attribute):
            owner = self.type_of(expr.value)
            if owner is None:
                return None
            if self.kind(owner) == "module":
                return self.module_member(owner, expr.attr)
            if f"{owner}.{expr.attr}" in self.api["classes"]:
                return f"{owner}.{expr.attr}"  # a nested class (Parameter.Type)
            field_type = self.api["classes"].get(owner, {}).get("field_types", {}).get(expr.attr)
            return field_type if field_type in self.api["classes"] else None  # msg.header.stamp
        if isinstance(expr, ast.Call):
            return self.instance_of(expr)
        return None

    def instance_of(self, expr: ast.expr) -> str | None:
        """The class of what a call returns: a constructor, a method with a known return class, super()."""
        if not isinstance(expr, ast.Call):
            return None
        func = expr.func
        if isinstance(func, ast.Name) and func.id == "super" and self.classes and self.classes[-1] in self.local:
            return self.local[self.classes[-1]].base
        if isinstance(func, ast.Attribute):
            owner = self.type_of(func.value)
            if owner is not None and self.kind(owner) != "module":
                sig = self.method(owner, func.attr)
                returns = sig.get("returns") if sig else None
                returns = returns or UNANNOTATED_RETURNS.get(func.attr)
                return returns if returns in self.api["classes"] else None
        callee = self.type_of(func)
        if callee is not None and (callee in self.local or self.kind(callee) == "class"):
            return callee
        return None

    def visit_Attribute(self, node: ast.Attribute) -> None:
        self.generic_visit(node)
        owner = self.type_of(node.value)
        if owner is None or node.attr in self.feature_checked:
            return
        if self.kind(owner) == "module":
            if self.module_member(owner, node.attr) is None:
                self.report(node, f"{owner}.{node.attr}: not in {self.version}")
            return
        attrs = self.class_attributes(owner)
        if attrs is not None and node.attr not in attrs:
            self.report(node, f"{self.rclpy_class(owner)}.{node.attr}: not in {self.version}")

    def visit_Call(self, node: ast.Call) -> None:
        self.generic_visit(node)
        sig: dict[str, Any] | None = None
        name = ""
        func = node.func
        if isinstance(func, ast.Attribute) and (owner := self.type_of(func.value)) is not None \
                and self.kind(owner) != "module":
            sig, name = self.method(owner, func.attr), f"{self.rclpy_class(owner)}.{func.attr}"
        else:
            callee = self.type_of(func)
            if callee is not None and self.kind(callee) == "function":
                sig, name = self.api["functions"][callee], callee
            elif callee is not None and (callee in self.local or self.kind(callee) == "class"):
                sig, name = self.method(callee, "__init__"), f"{callee}()"
        if sig is None or sig["varkw"]:
            return
        for kw in node.keywords:
            if kw.arg is not None and kw.arg not in sig["params"]:
                self.report(node, f"{name}: no keyword {kw.arg!r} in {self.version}")


def feature_checks(tree: ast.AST) -> set[str]:
    """Names tested with ``hasattr(x, "name")`` / ``getattr(x, "name", ...)``: uses of them are guarded."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("hasattr", "getattr") \
                and len(node.args) >= 2 and isinstance(name := node.args[1], ast.Constant) \
                and isinstance(name.value, str):
            found.add(name.value)
    return found


def check_source(source: str, path: str, api: dict[str, Any], *, allow_feature_checked: bool = False) -> list[str]:
    """Problems found in ``source`` against ``api``; with ``allow_feature_checked`` (the compat module only),
    a name the module tests with hasattr/getattr may be used where the release lacks it."""
    tree = ast.parse(source, filename=path)
    checker = Checker(api, path, feature_checks(tree) if allow_feature_checked else set())
    checker.visit(tree)
    return checker.problems
