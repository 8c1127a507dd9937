"""Code versions for Snakemake reruns and for provenance sidecars.

Snakemake reruns a job when its params change, not when a module its command imports changes. Each
rule therefore passes ``code_version(<module>)``: a hash of the module's source and of every brainfuse
module it imports, found by reading the import statements (so the list can never go stale).
"""
from __future__ import annotations

import ast
import hashlib
from functools import lru_cache
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent


def _module_file(name: str) -> Path:
    """Source of brainfuse module ``name``, a dotted path relative to the package ('dwi', 'phantom.generator'); a
    subpackage's ('phantom') is its __init__.py."""
    path = PACKAGE.joinpath(*name.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_name(path.name + ".py")


@lru_cache(maxsize=None)
def local_imports(name: str) -> frozenset[str]:
    """brainfuse modules imported (anywhere, lazily too) by module ``name`` (e.g. 'dwi', 'phantom.generator'), as
    dotted paths relative to the package. Relative imports resolve against the module's own package (inside
    ``phantom``: ``from . import x`` -> 'phantom.x', ``from ..io import y`` -> 'io'); importing a module of a
    subpackage also counts that subpackage (its __init__.py runs first). The top package's __init__ is not counted."""
    file = _module_file(name)
    parts = name.split(".")
    package = parts if file.name == "__init__.py" else parts[:-1]     # what level-1 imports are relative to
    found = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:                                             # from .x import y / from .. import x, ...
                if node.level - 1 > len(package):
                    continue                                           # above brainfuse
                base = package[:len(package) - (node.level - 1)] + (node.module.split(".") if node.module else [])
            elif node.module and node.module.split(".")[0] == "brainfuse":   # from brainfuse[.x] import y
                base = node.module.split(".")[1:]
            else:
                continue
            targets = [base] + [base + [a.name] for a in node.names]   # y may be a module or a name in one
        elif isinstance(node, ast.Import):                             # import brainfuse.x.y
            targets = [a.name.split(".")[1:] for a in node.names if a.name.split(".")[0] == "brainfuse"]
        else:
            continue
        for t in targets:
            found.update(".".join(t[:i]) for i in range(1, len(t) + 1))
    return frozenset(m for m in found if m != name and _module_file(m).exists())


def dependencies(name: str) -> list[str]:
    """``name`` and every brainfuse module it reaches through imports, sorted."""
    seen, todo = set(), [name]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(local_imports(m))
    return sorted(seen)


def code_version(name: str) -> str:
    """12-hex-digit hash of the sources ``name`` depends on (pass as a Snakemake ``params:`` value)."""
    h = hashlib.sha256()
    for m in dependencies(name):
        h.update(m.encode() + b"\0" + _module_file(m).read_bytes())
    return h.hexdigest()[:12]


def file_sha256(path, chunk: int = 1 << 20) -> str:
    """Content hash of a file, for the provenance sidecars of derived tensors."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def source_hash() -> str:
    """12-hex-digit hash of every brainfuse source file (as `brainfuse --version` prints it): tells a checkout
    between releases apart in the derivatives' dataset_description.json."""
    h = hashlib.sha256()
    for f in sorted(PACKAGE.rglob("*.py")):            # subpackages (phantom/) too, by their path in the package
        h.update(f.relative_to(PACKAGE).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:12]
