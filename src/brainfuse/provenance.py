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
    return PACKAGE / (name.replace(".", "/") + ".py")


@lru_cache(maxsize=None)
def local_imports(name: str) -> frozenset[str]:
    """brainfuse modules imported (anywhere, lazily too) by module ``name`` (e.g. 'dwi')."""
    tree = ast.parse(_module_file(name).read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:            # from .x import y
                found.add(node.module)
            elif node.level == 1:                          # from . import x, y
                found.update(a.name for a in node.names)
            elif node.module and node.module.startswith("brainfuse."):
                found.add(node.module.split(".", 1)[1])
            elif node.module == "brainfuse":
                found.update(a.name for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".", 1)[1] for a in node.names if a.name.startswith("brainfuse."))
    return frozenset(m for m in found if _module_file(m).exists())


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
    for f in sorted(PACKAGE.rglob("*.py")):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:12]
