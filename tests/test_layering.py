"""The package's layering: no module imports from a layer above its own, except the allowlisted imports.

Every import of every module under arrag_kernels/ is read from its source (``ast``), lazy imports
inside functions included, and resolved to the module it names (``from .x import y`` names module
``x.y`` when that is a module, else ``x``). Layers, bottom-up, as the code uses them:

    base        config, the compiled extension and its loader, memory accounting (profiling)
    ops         stateless operations and their backends
    models      model adapters
    retrieval   patch databases and their search
    faid        FAiD blender modules, checkpoints, training
    decoding    the KV-cached decode loop, DAiD sampler, FAiD runtime, logits processor
    uses        masked decoding, evaluation, patching of HF models, serving engines (vLLM)
    front ends  the public package namespace, CLIs, demo, miniature model

A module may import from its own layer and the layers below.
"""

from __future__ import annotations

import ast
from pathlib import Path

import arrag_kernels

PACKAGE = Path(arrag_kernels.__file__).parent

# Module-name prefix -> layer; the longest matching prefix wins.
LAYERS = ["base", "ops", "models", "retrieval", "faid", "decoding", "uses", "front ends"]
LAYER_OF_PREFIX = {
    "arrag_kernels.config": "base",
    "arrag_kernels._ext": "base",
    "arrag_kernels.profiling": "base",
    "arrag_kernels._C": "base",
    "arrag_kernels.ops": "ops",
    "arrag_kernels.models": "models",
    "arrag_kernels.retrieval": "retrieval",
    "arrag_kernels.faid": "faid",
    "arrag_kernels.decoding": "decoding",
    "arrag_kernels.masked": "uses",
    "arrag_kernels.eval": "uses",
    "arrag_kernels.patching": "uses",
    "arrag_kernels.serving": "uses",
    "arrag_kernels": "front ends",  # the package's __init__ re-exports the public API of every layer
    "arrag_kernels.__main__": "front ends",
    "arrag_kernels.cli": "front ends",
    "arrag_kernels.demo": "front ends",
    "arrag_kernels.miniature": "front ends",
}

# (importing module, imported module) -> why this upward import is allowed. Empty: every import points down.
ALLOWED_UPWARD: dict[tuple[str, str], str] = {}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    """Whether ``name`` is a module of the package: a .py file, a package, or the compiled extension
    (named even where it is not built)."""
    path = PACKAGE.parent.joinpath(*name.split("."))
    return name == "arrag_kernels._C" or path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) of every import of the package's modules in ``path``, at any depth."""
    module = _module_name(path)
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.append((node.lineno, candidate if _is_module(candidate) else base))
    return [(line, name) for line, name in found if name == "arrag_kernels" or name.startswith("arrag_kernels.")]


def _layer(module: str) -> str:
    prefixes = [p for p in LAYER_OF_PREFIX if module == p or module.startswith(p + ".")]
    return LAYER_OF_PREFIX[max(prefixes, key=len)]


def _upward_imports() -> list[tuple[str, int, str, str]]:
    """(file, line, importer, imported) of every import from a layer above the importer's."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        importer = _module_name(path)
        for line, imported in _imports(path):
            if LAYERS.index(_layer(imported)) > LAYERS.index(_layer(importer)):
                found.append((str(path.relative_to(PACKAGE.parent)), line, importer, imported))
    return found


def test_every_module_has_a_layer():
    """A new top-level module must be placed in LAYER_OF_PREFIX (it would otherwise count as a front end)."""
    unplaced = sorted(m for m in map(_module_name, PACKAGE.rglob("*.py"))
                      if m != "arrag_kernels" and not any(m == p or m.startswith(p + ".") for p in LAYER_OF_PREFIX
                                                          if p != "arrag_kernels"))
    assert not unplaced, f"modules without a layer (add them to LAYER_OF_PREFIX): {unplaced}"
    assert _layer("arrag_kernels.cli.faid") == "front ends" and _layer("arrag_kernels.faid.modules") == "faid"


def test_imports_follow_the_layers():
    offending = [(file, line, importer, imported) for file, line, importer, imported in _upward_imports()
                 if (importer, imported) not in ALLOWED_UPWARD]
    assert not offending, "imports from a higher layer (fix the import, or allowlist it with a reason):\n" + "\n".join(
        f"  {file}:{line}: {importer} ({_layer(importer)}) imports {imported} ({_layer(imported)})"
        for file, line, importer, imported in offending)


def test_allowlist_has_no_stale_entries():
    used = {(importer, imported) for _, _, importer, imported in _upward_imports()}
    stale = sorted(set(ALLOWED_UPWARD) - used)
    assert not stale, f"allowlisted upward imports that no longer exist (remove them): {stale}"


def test_resolution_finds_lazy_and_relative_imports():
    """The scanner sees imports inside functions and resolves relative ones (guards the test itself)."""
    assert "arrag_kernels.decoding.logits" in {name for _, name in _imports(PACKAGE / "patching.py")}  # in a method
    assert "arrag_kernels._C" in {name for _, name in _imports(PACKAGE / "_ext.py")}  # from . import _C
    assert "arrag_kernels.ops._triton" in {name for _, name in _imports(PACKAGE / "ops" / "__init__.py")}
    assert "arrag_kernels.faid.modules" in {name for _, name in _imports(PACKAGE / "masked" / "faid.py")}


def test_one_place_builds_queries_from_a_grid():
    """Query-from-grid + search is written once (retrieval/query.py's Retriever): no other module of the
    package outside ops/ calls the query op ``neighbor_keys``."""
    callers = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.is_relative_to(PACKAGE / "ops"):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call):
                f = node.func
                name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
                if name == "neighbor_keys":
                    callers.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    assert callers == [c for c in callers if c.startswith("arrag_kernels/retrieval/query.py:")] and callers, callers
