#!/usr/bin/env python3
"""Write the ROS 2 message and service definitions of one distribution, read from local git clones, as JSON.

    git clone https://github.com/ros2/common_interfaces; git clone https://github.com/ros2/rcl_interfaces
    python scripts/extract_ros_interfaces.py --ref humble --out tests/data/humble_ros_interfaces.json \\
        --git-dir common_interfaces=https://github.com/ros2/common_interfaces \\
        --git-dir rcl_interfaces=https://github.com/ros2/rcl_interfaces

For every ``<package>/msg/*.msg`` and ``<package>/srv/*.srv`` at ``--ref`` (read with ``git show``, no
checkout, nothing downloaded) it records the fields (name -> type as written, ``pkg/Name`` for
messages) and constants. ``tests/test_ros_distro_api.py`` checks the package's message use against it.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
from pathlib import Path
from typing import Any

FIELD_RE = re.compile(r"^([\w/]+(?:<=\d+)?(?:\[[^\]]*\])?)\s+(\w+)(\s*=)?")


def git(git_dir: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(git_dir), *args], check=True, capture_output=True, text=True).stdout


def parse(text: str, package: str) -> dict[str, Any]:
    """Fields and constants of one ``.msg`` text (or one half of a ``.srv``)."""
    fields: dict[str, str] = {}
    constants: list[str] = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        match = FIELD_RE.match(line)
        if not match:
            continue
        ftype, name, is_constant = match.groups()
        if is_constant:
            constants.append(name)
            continue
        base = re.sub(r"(<=\d+)?(\[[^\]]*\])?$", "", ftype)
        if "/" not in base and base[:1].isupper():
            ftype = f"{package}/{ftype}"  # a message of the same package
        fields[name] = ftype
    return {"fields": fields, "constants": constants}


def extract(clones: list[str], ref: str) -> dict[str, Any]:
    sources, interfaces = [], {}
    for clone in clones:
        path_text, _, url = clone.partition("=")
        git_dir = Path(path_text)
        commit = git(git_dir, "rev-parse", f"{ref}^{{commit}}").strip()
        sources.append({"repository": url, "ref": ref, "commit": commit,
                        "commit_date": git(git_dir, "log", "-1", "--format=%cI", commit).strip()})
        for path in sorted(git(git_dir, "ls-tree", "-r", "--name-only", commit).split()):
            parts = path.split("/")
            if len(parts) != 3 or parts[1] not in ("msg", "srv") or not parts[2].endswith(f".{parts[1]}"):
                continue
            package, kind, name = parts[0], parts[1], parts[2].rsplit(".", 1)[0]
            text = git(git_dir, "show", f"{commit}:{path}")
            if kind == "msg":
                interfaces[f"{package}/msg/{name}"] = parse(text, package)
            else:
                request, _, response = text.partition("\n---")
                interfaces[f"{package}/srv/{name}"] = {"request": parse(request, package),
                                                       "response": parse(response, package)}
    return {"source": sources, "generator": "scripts/extract_ros_interfaces.py", "interfaces": interfaces}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--git-dir", action="append", required=True, metavar="PATH=URL",
                        help="a local clone of an interfaces repository and the URL it was cloned from (repeat)")
    parser.add_argument("--ref", default="humble")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    data = extract(args.git_dir, args.ref)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(args.out)
    print(f"{args.out}: {len(data['interfaces'])} interfaces from {len(data['source'])} repositories")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
