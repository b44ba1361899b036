"""Digest of the source code that builds an artifact, for its cache key (issue 12, item 1).

A stage's code is given as *roots*: a module (``"vaa.methods.vaa"``) or named top-level
functions of one (``"vaa.pipeline.stages:build_aligned,train"``). A module root brings in
every ``vaa`` module it imports (statically, from its AST, including imports inside
functions) and the ``__init__.py`` of each package on the way, transitively; a function root
hashes only the source text of those functions (``stages.py`` imports every stage's code,
so following it would tie every key to every file).

Modules whose content reaches the key as config values, not as code (the schemas), and
code that changes no artifact (logging, the cache, the report) are never followed:
``NOT_BUILD_CODE``.

The digest hashes, per file, its path relative to the ``vaa`` package (``/``-separated) and
its bytes, in sorted path order: the same in every process and every checkout, blind to
``__pycache__``, file times and the checkout's location. It is computed once per process
(files are assumed not to change under a running job); ``root`` is a parameter so tests can
point it at an edited copy of the package.
"""

from __future__ import annotations

import ast
import hashlib
from functools import lru_cache
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # .../vaa

NOT_BUILD_CODE = ("vaa.config", "vaa.restore.schema", "vaa.tracking", "vaa.report", "vaa.cli",
                  "vaa.pipeline.cache", "vaa.pipeline.keys", "vaa.pipeline.source_digest",
                  "vaa.pipeline.run", "vaa.pipeline.stages")


def _excluded(module: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in NOT_BUILD_CODE)


def _file(module: str, root: Path) -> Path | None:
    """The file of ``vaa.a.b`` under ``root`` (the ``vaa`` folder): a/b.py or a/b/__init__.py."""
    parts = module.split(".")
    if parts[0] != "vaa":
        return None
    base = root.joinpath(*parts[1:])
    for f in (base.with_suffix(".py") if len(parts) > 1 else None, base / "__init__.py"):
        if f is not None and f.is_file():
            return f
    return None


def _imports(module: str, path: Path) -> set[str]:
    """Every ``vaa`` module ``path`` imports (absolute or relative, at any depth), and for
    ``from m import x`` also ``m.x`` (it may be a submodule; non-modules are dropped later)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_bytes(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return {m for m in found if m == "vaa" or m.startswith("vaa.")}


def _parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


@lru_cache(maxsize=None)
def module_files(module: str, root: str = str(PACKAGE_ROOT)) -> frozenset[Path]:
    """Files of ``module``, its packages' ``__init__.py`` and everything they import from
    ``vaa``, transitively (``NOT_BUILD_CODE`` excluded). Unknown modules: empty."""
    base = Path(root)
    seen: set[str] = set()
    files: set[Path] = set()
    todo = [module]
    while todo:
        m = todo.pop()
        if m in seen or _excluded(m):
            continue
        seen.add(m)
        f = _file(m, base)
        if f is None:
            continue
        files.add(f)
        todo += _parents(m)
        todo += sorted(_imports(m, f))
    return frozenset(files)


@lru_cache(maxsize=None)
def _file_bytes(path: Path) -> bytes:
    return path.read_bytes()


def _function_source(module: str, names: tuple[str, ...], root: Path) -> bytes:
    """The source text of the named top-level functions/classes of ``module``, in the
    order given. Raises ``ValueError`` naming the module and function if one is missing."""
    path = _file(module, root)
    if path is None:
        raise ValueError(f"code digest: no module {module} under {root}")
    text = _file_bytes(path).decode("utf-8")
    defs = {n.name: n for n in ast.parse(text).body
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    out = []
    for name in names:
        if name not in defs:
            raise ValueError(f"code digest: {module} has no top-level {name}; fix the stage's "
                             f"roots in vaa/pipeline/keys.py")
        out.append(ast.get_source_segment(text, defs[name]).encode("utf-8"))
    return b"\0".join(out)


@lru_cache(maxsize=None)
def code_digest(roots: tuple[str, ...], root: str = str(PACKAGE_ROOT)) -> str:
    """16-hex digest of the code named by ``roots`` (see the module docstring)."""
    base = Path(root)
    files: set[Path] = set()
    functions: list[tuple[str, bytes]] = []
    for r in sorted(set(roots)):
        module, _, names = r.partition(":")
        if names:
            functions.append((r, _function_source(module, tuple(names.split(",")), base)))
        else:
            files |= module_files(module, root)
    h = hashlib.sha256()
    for rel, f in sorted((f.relative_to(base).as_posix(), f) for f in files):
        h.update(rel.encode() + b"\0" + _file_bytes(f) + b"\0")
    for name, src in functions:
        h.update(name.encode() + b"\0" + src + b"\0")
    return h.hexdigest()[:16]


def target_module(target: str) -> str:
    """The module of a ``_target_`` (``vaa.methods.vaa.VAA`` → ``vaa.methods.vaa``)."""
    return target.rpartition(".")[0]
