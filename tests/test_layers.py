"""The package's shape, measured on its import graph (issue 12, "The shape to reach"):
no import cycle, no module importing a layer above its own, no file over 15% of the package's
lines, and a thin FUSE adapter. docs/design.md explains the layers.

Every ``import`` counts, including imports inside functions (they run too) and imports under
``if TYPE_CHECKING`` (a type checker follows them). Importing ``a.b.c`` also runs ``a/b/__init__``;
that implicit edge is not counted, so package ``__init__`` files of lower layers stay empty."""
from __future__ import annotations

import ast
import os

import pytest

import ossfuse

PACKAGE_DIR = os.path.dirname(ossfuse.__file__)

# Layer of each module (higher calls lower). A module may import its own layer or any below,
# never one above. "leaf" modules import only leaves and are usable by all.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    # commands and the daemon around the mount; rekey is a command (``ossfuse rekey``) that
    # copies objects with new envelopes through the uploader, so it sits with the tools
    ("tools", ("ossfuse.__main__", "ossfuse.cli", "ossfuse.daemon", "ossfuse.registry", "ossfuse.status",
               "ossfuse.rekey")),
    ("adapter", ("ossfuse.fuse_ops",)),
    ("fs", ("ossfuse.fs",)),
    ("writeback", ("ossfuse.writeback", "ossfuse.cache", "ossfuse.attrcache")),
    ("crypto", ("ossfuse.keyring", "ossfuse.kms", "ossfuse.cmk")),
    ("store", ("ossfuse.store",)),
    # the envelope format (pure: parsing, AES-CTR), its integrity tags, configuration, trio helpers
    ("leaf", ("ossfuse", "ossfuse.envelope", "ossfuse.integrity", "ossfuse.config", "ossfuse.aio", "ossfuse.retry",
              "ossfuse.sqlitecache")),
]
PACKAGE = "ossfuse"  # as an entry above: the package's own __init__ only, not its submodules
MAX_SHARE = 0.15  # of the package's lines, per file
ADAPTER_MAX_LINES = 400


def modules(package_dir: str, package: str = "ossfuse") -> dict[str, str]:
    """Dotted module name → file path, for every .py file under ``package_dir``."""
    found = {}
    for root, dirs, files in os.walk(package_dir):
        dirs[:] = [d for d in dirs if not d.startswith((".", "__pycache__"))]
        for f in files:
            if not f.endswith(".py"):
                continue
            rel = os.path.relpath(os.path.join(root, f), package_dir)[:-3].split(os.sep)
            if rel[-1] == "__init__":
                rel = rel[:-1]
            found[".".join([package] + rel)] = os.path.join(root, f)
    return found


def import_graph(mods: dict[str, str], package: str = "ossfuse") -> dict[str, set[str]]:
    """Module → the package's modules it imports (relative imports resolved; ``from X import
    y`` counts as importing ``X.y`` when that is a module, else ``X``)."""
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        is_pkg = os.path.basename(path) == "__init__.py"
        pkg_parts = name.split(".") if is_pkg else name.split(".")[:-1]
        edges: set[str] = set()
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base_parts = pkg_parts[:len(pkg_parts) - (node.level - 1)]
                    base = ".".join(base_parts + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for t in targets:
                while t and t not in mods and "." in t:  # "ossfuse.store.base.X" → the module
                    t = t.rpartition(".")[0]
                if t in mods and t != name and (t == package or t.startswith(package + ".")):
                    edges.add(t)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def layer_of(module: str) -> int:
    """Index of ``module``'s layer (0 = top); the longest matching prefix decides."""
    best, best_len = -1, -1
    for i, (_name, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or (p != PACKAGE and module.startswith(p + "."))) and len(p) > best_len:
                best, best_len = i, len(p)
    return best


def line_counts(mods: dict[str, str]) -> dict[str, int]:
    counts = {}
    for name, path in mods.items():
        with open(path, encoding="utf-8") as f:
            counts[name] = sum(1 for _ in f)
    return counts


def oversized(mods: dict[str, str]) -> list[tuple[str, int, float]]:
    """Modules over MAX_SHARE of the package's lines: (name, lines, share)."""
    counts = line_counts(mods)
    total = sum(counts.values())
    return [(n, c, c / total) for n, c in sorted(counts.items()) if c > MAX_SHARE * total]


MODS = modules(PACKAGE_DIR)
GRAPH = import_graph(MODS)


def test_graph_is_read():
    # the analysis itself: a few edges that must be seen, relative and absolute
    assert "ossfuse.fs" in GRAPH["ossfuse.fuse_ops"]
    assert "ossfuse.fs.model" in GRAPH["ossfuse.fs.inodes"]
    assert "ossfuse.store.base" in GRAPH["ossfuse.fs.resolve"]
    assert "ossfuse.kms" in GRAPH["ossfuse.keyring"]  # a function-local import counts
    assert len(MODS) >= 30


def test_analysis_finds_a_cycle_and_an_upward_import():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert layer_of("ossfuse.fs.files") < layer_of("ossfuse.writeback.staging") < layer_of("ossfuse.store.oss")
    assert layer_of("ossfuse.not_placed") == -1  # the package entry does not cover new modules


def test_no_import_cycle():
    assert find_cycle(GRAPH) is None


def test_every_module_has_a_layer():
    assert [m for m in MODS if layer_of(m) < 0] == []


@pytest.mark.parametrize("module", sorted(MODS))
def test_no_upward_import(module):
    mine = layer_of(module)
    upward = sorted(t for t in GRAPH[module] if layer_of(t) < mine)
    assert upward == [], f"{module} ({LAYERS[mine][0]}) imports a layer above it: {upward}"


def test_leaves_import_only_leaves():
    leaves = {m for m in MODS if LAYERS[layer_of(m)][0] == "leaf"}
    assert {m: sorted(GRAPH[m] - leaves) for m in leaves if GRAPH[m] - leaves} == {}


def test_no_file_over_15_percent_of_the_package():
    assert oversized(MODS) == []


def test_fuse_adapter_is_thin():
    assert line_counts(MODS)["ossfuse.fuse_ops"] <= ADAPTER_MAX_LINES
