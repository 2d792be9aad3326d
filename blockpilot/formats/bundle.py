"""Bundles, the one directory that travels from a workstation to the car (standard library only): ``model/``,
``graphs/<variant>/``, ``engines/<target>/``, ``quant/`` and ``manifest.json``, which lists every other file's
size and sha256, the model config, schema, precision map, recipe, graphs, engines and the tools that built them.
A signed bundle also holds ``manifest.sig`` (:mod:`blockpilot.formats.signing`), checked when trusted keys are given."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import re
import shutil
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from blockpilot import __version__
from blockpilot.formats.file_hash import sha256_file
from blockpilot.formats.onnx_external import check_bundle_graphs, graph_files

from ..atomic_io import atomic_write, replace_dir, staging_dir
from ..errors import BlockpilotError

if TYPE_CHECKING:
    from .signing import SigningKey, TrustedKeys

FORMAT = "blockpilot-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"  # beside the manifest, not listed in it (blockpilot.formats.signing)
CHUNK = 1 << 20
ROLE_DIRS: dict[str, str] = {"model": "model", "graph": "graphs", "engine": "engines", "quant": "quant"}
MODEL_FILES = ("config.json", "tokenizer.json", "vocab.json", "merges.txt", "added_tokens.json",  # or the BPE files
               "tokenizer_config.json", "preprocessor_config.json", "blockpilot.json")
QUANT_FILES = ("precision_map.json", "modelopt_state.pth", "quantized_weights.pth")
TOOL_DISTRIBUTIONS: dict[str, tuple[str, ...]] = {
    "torch": ("torch",), "onnx": ("onnx",), "onnxruntime": ("onnxruntime", "onnxruntime-gpu"),
    "modelopt": ("nvidia-modelopt",), "tensorrt": ("tensorrt", "tensorrt-cu13", "tensorrt-cu12"),
    "tensorrt_rtx": ("tensorrt-rtx", "tensorrt-rtx-cu13", "tensorrt-rtx-cu12")}


class BundleError(BlockpilotError, ValueError):
    """A bundle that cannot be written or loaded as asked; the message names the file."""


class BundleVersionError(BundleError):
    """The bundle's format version or build-tool versions do not match this runtime."""


def tool_versions() -> dict[str, str]:
    """Versions of the build tools installed here (from package metadata, nothing imported), by tool name."""
    found: dict[str, str] = {}
    for tool, dists in TOOL_DISTRIBUTIONS.items():
        for name in (n for d in dists for n in (d, d.replace("-", "_"))):
            with contextlib.suppress(importlib.metadata.PackageNotFoundError):
                found.setdefault(tool, importlib.metadata.version(name))
    return found


def _check_rel(rel: str, where: str) -> str:
    if rel in (MANIFEST, SIGNATURE) or rel.startswith("/") or "\\" in rel or \
            any(p in ("", ".", "..") for p in rel.split("/")):
        raise BundleError(f"{where}: {rel!r} is not a valid file path inside the bundle")
    return rel


def _walk_files(root: Path) -> Iterator[tuple[str, Path]]:
    """(POSIX path relative to ``root``, path) of every entry but real directories (links are not followed)."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames + [d for d in dirnames if (Path(dirpath) / d).is_symlink()]):
            yield (Path(dirpath) / name).relative_to(root).as_posix(), Path(dirpath) / name


def _read_json_object(path: Path, raw: bytes | None = None) -> dict[str, Any]:
    try:
        data = json.loads(path.read_bytes() if raw is None else raw)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        state = "missing" if isinstance(exc, FileNotFoundError) else "not readable JSON"
        raise BundleError(f"{path}: {state} ({exc})") from exc
    if not isinstance(data, dict):
        raise BundleError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


@dataclass(frozen=True)
class Artifact:
    """A graph or engine; ``extra_files``: external data, inspector JSON; ``tools``: what built an engine."""

    kind: str  # "graph" | "engine"
    path: str
    role: str  # "lm_step", "vision", ...
    variant: str  # "decomposed", "plugin", ...
    precision: str
    io: dict[str, Any] = field(default_factory=dict)
    target: str | None = None
    sm: str | None = None
    extra_files: tuple[str, ...] = ()
    tools: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items() if k != "kind"}

    @classmethod
    def from_dict(cls, kind: str, data: Any, where: str) -> Artifact:
        if not (isinstance(data, dict) and all(isinstance(data.get(k), str) for k in ("path", "role", "variant"))
                and isinstance(data.get("precision"), str) and isinstance(data.get("io", {}), dict)
                and isinstance(data.get("tools", {}), dict) and isinstance(data.get("extra_files", []), list)
                and (kind == "graph" or isinstance(data.get("target"), str))):
            raise BundleError(f"{where}: malformed {kind} entry {json.dumps(data)[:200]}")
        sm, tools = data.get("sm"), data.get("tools", {})
        return cls(kind, data["path"], data["role"], data["variant"], data["precision"], data.get("io", {}),
                   data.get("target"), None if sm is None else str(sm),
                   tuple(str(x) for x in data.get("extra_files", [])), {str(k): str(v) for k, v in tools.items()})


class BundleWriter:
    """Stage a bundle beside ``out_dir``; :meth:`finish` writes the manifest last and renames it into place
    (a ``with`` block finishes on a clean exit, drops the staging if it raises). An existing ``out_dir`` is
    refused unless ``overwrite`` (then only an empty dir or a bundle). ``tools`` adds to the versions found
    here. Assign ``model_config``, ``schema``, ``precision_map``, ``recipe``, or let add_model/add_quant. ``sign``
    (a private key file or a loaded :class:`~blockpilot.formats.signing.SigningKey`) signs the manifest."""

    def __init__(self, out_dir: str | Path, *, overwrite: bool = False, tools: Mapping[str, str] | None = None,
                 sign: SigningKey | str | Path | None = None):
        self.out_dir, self.overwrite = Path(out_dir).absolute(), overwrite
        self._check_target()
        if isinstance(sign, (str, Path)):  # a bad key is refused before anything is staged
            from .signing import load_signing_key

            sign = load_signing_key(sign)
        self.signer: SigningKey | None = sign
        self.staging = staging_dir(self.out_dir)
        self.tools: dict[str, str] = {**tool_versions(), **dict(tools or {})}
        self.model_config: dict[str, Any] | None = None
        self.schema: dict[str, Any] | None = None
        self.precision_map: dict[str, Any] = {}
        self.recipe: dict[str, Any] | None = None
        self.artifacts: list[Artifact] = []
        self._done = False

    def add_file(self, src: str | Path, role: str, rel: str | None = None) -> str:
        """Copy ``src`` to ``<role dir>/<rel or its name>`` (kept if already there); returns its bundle path."""
        if role not in ROLE_DIRS or not Path(src).is_file():
            raise BundleError(f"{src}: not a file, or role {role!r} is none of {', '.join(ROLE_DIRS)}")
        if self._done:
            raise BundleError(f"{self.out_dir}: this bundle writer is already finished or aborted")
        dst = self.staging / _check_rel(f"{ROLE_DIRS[role]}/{rel or Path(src).name}", str(src))
        dst.parent.mkdir(parents=True, exist_ok=True)
        if not (dst.exists() and dst.samefile(src)):
            with Path(src).open("rb") as fin, dst.open("wb") as fout:
                shutil.copyfileobj(fin, fout, CHUNK)
                fout.flush()
                os.fsync(fout.fileno())
        return dst.relative_to(self.staging).as_posix()

    def add_dir(self, src: str | Path, role: str, subdir: str = "") -> list[str]:
        """Copy every file under directory ``src`` into ``<role dir>/<subdir>/``; returns their bundle paths."""
        if not Path(src).is_dir():
            raise BundleError(f"{src}: not a directory")
        return [self.add_file(path, role, f"{subdir}/{rel}".lstrip("/")) for rel, path in _walk_files(Path(src))]

    def add_model(self, checkpoint_dir: str | Path, *, weights: bool = True) -> list[str]:
        """Copy a checkpoint's JSON files and (``weights``) safetensors to ``model/``; read config and schema."""
        root = Path(checkpoint_dir)
        config = _read_json_object(root / "config.json")
        shards = sorted(p.name for p in root.glob("*.safetensors*")) if weights else []  # with the shard index
        if weights and not any(n.endswith(".safetensors") for n in shards):
            raise BundleError(f"{root}: no *.safetensors weights to copy")
        if self.schema is None and (root / "blockpilot.json").is_file():
            if not isinstance(schema := _read_json_object(root / "blockpilot.json").get("schema"), dict):
                raise BundleError(f"{root / 'blockpilot.json'}: holds no 'schema' object")
            self.schema = schema
        self.model_config = config if self.model_config is None else self.model_config
        return [self.add_file(root / n, "model") for n in (*MODEL_FILES, *shards) if (root / n).is_file()]

    def add_quant(self, quant_dir: str | Path) -> list[str]:
        """Copy a ``save_quantized`` directory to ``quant/``; read its precision map and recipe unless set."""
        root = Path(quant_dir)
        if not isinstance((info := _read_json_object(root / QUANT_FILES[0])).get("precision"), dict):
            raise BundleError(f"{root / QUANT_FILES[0]}: holds no 'precision' map")
        self.precision_map = self.precision_map or info["precision"]
        if self.recipe is None and isinstance(info.get("recipe"), dict):
            self.recipe = info["recipe"]
        return [self.add_file(root / n, "quant") for n in QUANT_FILES if (root / n).is_file()]

    def add_graph(self, src: str | Path, *, role: str, variant: str, precision: str,
                  io: Mapping[str, Any] | None = None, extra_files: Sequence[str | Path] = ()) -> Artifact:
        """Copy an ONNX graph, the external data it references (all required), ``extra_files`` to graphs/<variant>."""
        rel = self.add_file(src, "graph", f"{variant}/{Path(src).name}")
        extra = tuple(dict.fromkeys(self.add_file(p, "graph", f"{variant}/{name}")
                                    for p, name in graph_files(src, extra_files, BundleError)))
        self.artifacts.append(Artifact("graph", rel, role, variant, precision, dict(io or {}), extra_files=extra))
        return self.artifacts[-1]

    def add_engine(self, src: str | Path, *, target: str, sm: str | int, role: str, variant: str, precision: str,
                   io: Mapping[str, Any] | None = None, inspector: str | Path | None = None,
                   tools: Mapping[str, str] | None = None, extra_files: Sequence[str | Path] = ()) -> Artifact:
        """Copy an engine (+ inspector JSON and other ``extra_files``, e.g. the network summary) to
        ``engines/<target>/``; ``tools`` built it (default: ours)."""
        rel = self.add_file(src, "engine", f"{target}/{Path(src).name}")
        sidecars = [*([] if inspector is None else [inspector]), *extra_files]
        extra = tuple(self.add_file(p, "engine", f"{target}/{Path(p).name}") for p in sidecars)
        built = dict(tools) if tools is not None else {k: v for k, v in self.tools.items() if k.startswith("tensorrt")}
        self.artifacts.append(Artifact("engine", rel, role, variant, precision, dict(io or {}), target, str(sm),
                                       extra, built))
        return self.artifacts[-1]

    def finish(self) -> Path:
        """Hash every staged file, write ``manifest.json`` atomically, then move the bundle into place."""
        if self._done or self.model_config is None or self.schema is None:
            raise BundleError(f"{self.out_dir}: {'writer already finished' if self._done else 'no config and schema'}")
        files = {rel: {"sha256": sha256_file(p), "bytes": p.stat().st_size} for rel, p in _walk_files(self.staging)}
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "blockpilot_version": __version__, "model_config": self.model_config, "schema": self.schema,
            "precision_map": self.precision_map, "recipe": self.recipe,
            "graphs": [a.to_dict() for a in self.artifacts if a.kind == "graph"],
            "engines": [a.to_dict() for a in self.artifacts if a.kind == "engine"], "files": files, "tools": self.tools}
        atomic_write(self.staging / MANIFEST, json.dumps(manifest, indent=2) + "\n")
        if self.signer is not None:
            from .signing import sign_manifest

            sign_manifest(self.staging, self.signer)
        self._check_target()
        replace_dir(self.staging, self.out_dir)  # readers see the old bundle, no bundle, or the new one, never a mix
        self._done = True
        return self.out_dir

    def abort(self) -> None:
        """Drop the staging directory; ``out_dir`` is left as it was."""
        if not self._done:
            shutil.rmtree(self.staging, ignore_errors=True)
            self._done = True

    def __enter__(self) -> BundleWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            if exc_type is None and not self._done:
                self.finish()
        finally:
            self.abort()

    def _check_target(self) -> None:
        if not ((out := self.out_dir).exists() or out.is_symlink()):
            return
        if not self.overwrite:
            raise BundleError(f"{out}: already exists; pass overwrite=True to replace it")
        if not out.is_dir() or out.is_symlink() or (any(out.iterdir()) and not (out / MANIFEST).is_file()):
            raise BundleError(f"{out}: exists and is not a bundle (no {MANIFEST}); refusing to replace it")


@dataclass(frozen=True)
class Bundle:
    """A loaded, checked bundle: its directory, its manifest and typed views of the manifest's parts."""

    path: Path
    manifest: dict[str, Any]
    model_config: dict[str, Any]
    schema: dict[str, Any]
    precision_map: dict[str, Any]
    recipe: dict[str, Any] | None
    tools: dict[str, str]
    files: dict[str, dict[str, Any]]
    artifacts: tuple[Artifact, ...]

    def graphs(self, variant: str | None = None) -> list[Artifact]:
        return [a for a in self.artifacts if a.kind == "graph" and variant in (None, a.variant)]

    def engines(self, target: str | None = None) -> list[Artifact]:
        return [a for a in self.artifacts if a.kind == "engine" and target in (None, a.target)]

    def file(self, rel: str) -> Path:
        """The path of a file the manifest lists; any other name is a :class:`BundleError`."""
        if rel not in self.files:
            raise BundleError(f"{self.path / rel}: not a file of this bundle (not listed in {MANIFEST})")
        return self.path / rel


_SECTIONS: dict[str, tuple[type, ...]] = {
    "model_config": (dict,), "schema": (dict,), "precision_map": (dict,), "recipe": (dict, type(None)),
    "graphs": (list,), "engines": (list,), "files": (dict,), "tools": (dict,)}


def _check_manifest(manifest: dict[str, Any], where: Path) -> tuple[Artifact, ...]:
    if manifest.get("format") != FORMAT:
        raise BundleError(f"{where}: not a {FORMAT} manifest (format={manifest.get('format')!r})")
    if (version := manifest.get("format_version")) != FORMAT_VERSION:
        raise BundleVersionError(f"{where}: bundle format version {version!r}, but this blockpilot "
                                 f"({__version__}) reads version {FORMAT_VERSION}")
    for key, types in _SECTIONS.items():
        if not isinstance(manifest.get(key), types):
            raise BundleError(f"{where}: {key!r} is missing or not a {' or '.join(t.__name__ for t in types)}")
    for rel, info in manifest["files"].items():
        _check_rel(rel, str(where))
        if not (isinstance(info, dict) and isinstance(info.get("sha256"), str) and type(info.get("bytes")) is int):
            raise BundleError(f"{where}: files[{rel!r}] needs a 'sha256' string and a 'bytes' integer")
    artifacts = tuple(Artifact.from_dict(kind, d, str(where)) for kind in ("graph", "engine")
                      for d in manifest[f"{kind}s"])
    for rel in (f for a in artifacts for f in (a.path, *a.extra_files)):
        if rel not in manifest["files"]:
            raise BundleError(f"{where}: graph/engine file {rel!r} is not listed in 'files'")
    return artifacts


def _check_files(root: Path, files: Mapping[str, Mapping[str, Any]], verify: bool) -> None:
    for rel, info in files.items():
        if (path := root / rel).is_symlink() or not path.is_file():
            state = "not a regular file" if path.exists() or path.is_symlink() else "missing"
            raise BundleError(f"{path}: {state} (listed in {MANIFEST})")
        if (size := path.stat().st_size) != info["bytes"]:
            raise BundleError(f"{path}: {'truncated' if size < info['bytes'] else 'modified'} "
                                       f"({size} bytes, {MANIFEST} lists {info['bytes']})")
    for rel, path in _walk_files(root):
        if rel not in files and rel not in (MANIFEST, SIGNATURE):
            raise BundleError(f"{path}: not listed in {MANIFEST} (planted or left over); refusing the bundle")
    for rel, info in files.items() if verify else ():
        if sha256_file(root / rel) != info["sha256"]:
            raise BundleError(f"{root / rel}: modified (sha256 differs from {MANIFEST})")


def check_tools(bundle: Bundle, required: Mapping[str, str]) -> None:
    """Each ``required`` tool (name -> runtime version) must match the major version of the engines' record,
    or of the manifest's ``tools`` where no engine has one."""
    for tool, runtime in required.items():
        built = ([(bundle.path / a.path, a.tools[tool]) for a in bundle.engines() if tool in a.tools]
                 or [(bundle.path / MANIFEST, v) for t, v in bundle.tools.items() if t == tool])
        if not built:
            raise BundleVersionError(f"{bundle.path}: records no {tool} version; this runtime has {tool} {runtime}")
        for where, version in built:
            if re.findall(r"\d+", version)[:1] != re.findall(r"\d+", runtime)[:1]:
                raise BundleVersionError(f"{where}: built with {tool} {version}, but this runtime has {tool} "
                                         f"{runtime}; the major versions must match")


def load_bundle(path: str | Path, *, verify: bool = True, require_tools: Mapping[str, str] | None = None,
                trusted_keys: TrustedKeys | Sequence[str | Path] | None = None) -> Bundle:
    """Read and check a bundle: manifest format, listed files' sizes (and sha256 when ``verify``), no
    unlisted file, and ``require_tools`` (see :func:`check_tools`). ``trusted_keys`` (public key files): the
    manifest's bytes must carry a signature by one of them (:func:`~blockpilot.formats.signing.check_signature`),
    checked before anything in it is used; every sha256 is then checked whatever ``verify`` says."""
    if not (where := Path(path) / MANIFEST).is_file():
        raise BundleError(f"{where}: missing (not a bundle, or an export that did not finish)")
    raw = where.read_bytes()
    if trusted_keys is not None:
        from .signing import check_signature, load_trusted_keys

        if trusted := load_trusted_keys(trusted_keys):
            check_signature(Path(path), raw, trusted)
            verify = True
    artifacts = _check_manifest(m := _read_json_object(where, raw), where)
    _check_files(Path(path), m["files"], verify)
    check_bundle_graphs(Path(path), [a.path for a in artifacts if a.kind == "graph"], m["files"], BundleError)
    bundle = Bundle(Path(path), m, m["model_config"], m["schema"], m["precision_map"], m["recipe"],
                    {str(k): str(v) for k, v in m["tools"].items()}, m["files"], artifacts)
    check_tools(bundle, require_tools or {})
    return bundle


def _size(n: int) -> str:
    return f"{n} B" if n < 1024 else f"{n / 1024:.1f} KiB" if n < 1 << 20 else f"{n / (1 << 20):.1f} MiB"


def describe_bundle(path: str | Path, *, verify: bool = True) -> str:
    """A human summary of a checked bundle (files, sizes, precisions, tools) for ``blockpilot inspect``."""
    from .signing import describe_signature

    b = load_bundle(path, verify=verify)
    arch = ", ".join(b.model_config.get("architectures") or []) or str(b.model_config.get("model_type", "?"))
    counts = Counter(f"{role} {label}".strip() for labels in b.precision_map.values()
                     for role, label in (labels.items() if isinstance(labels, dict) else [("", labels)]))
    precision = ", ".join(f"{k} x{v}" for k, v in sorted(counts.items()))
    lines = [
        f"bundle     {b.path}  ({'sha256 verified' if verify else 'sizes checked, sha256 not verified'})",
        f"format     {FORMAT} v{FORMAT_VERSION}, created {b.manifest.get('created_at')}, "
        f"blockpilot {b.manifest.get('blockpilot_version')}",
        f"model      {arch}; schema {b.schema.get('kind', '?')}",
        f"precision  {f'{len(b.precision_map)} modules; {precision}' if counts else 'full precision (empty map)'}",
        f"recipe     {(b.recipe or {}).get('name', 'none')}",
        f"tools      {', '.join(f'{k} {v}' for k, v in sorted(b.tools.items())) or 'none recorded'}",
        f"signature  {describe_signature(b.path)}",
    ]
    lines += [f"{a.kind:<10} {a.path}  ({a.role}, {a.variant}, {a.precision}"  # an LM engine's cache dtype, if recorded
              f"{f', target {a.target} sm {a.sm}' if a.kind == 'engine' else ''}"
              f"{f', KV cache {kv}' if (kv := ((a.io or {}).get('kv_cache') or {}).get('dtype')) else ''})"
              for a in b.artifacts]
    lines.append(f"files      {len(b.files)}, {_size(sum(i['bytes'] for i in b.files.values()))} in all")
    lines += [f"  {_size(i['bytes']):>10}  {rel}" for rel, i in sorted(b.files.items())]
    return "\n".join(lines)
