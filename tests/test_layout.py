"""The package's layers: imports run downward only, and no module imports itself back."""
import ast
from pathlib import Path

import cifarkit

SRC = Path(cifarkit.__file__).parent
# lowest first; a module may import its own layer and the layers below
LAYERS = [
    {"version", "errors", "console", "presets", "models", "images", "rundir", "weights"},
    {"data"},
    {"trust"},
    {"train"},
    {"report"},
    {"sweep"},
    {"serve"},
    {"cli", "__main__", "__init__"},  # the front doors: the CLI and `cifarkit.load`
]
ROOT_ORDER = ["version", "errors", "console", "presets", "models", "images", "rundir", "weights"]


def _layer(mod: str) -> int:
    head = mod.split(".")[0]
    return next(i for i, names in enumerate(LAYERS) if head in names)


def _imports(top_level_only: bool = False) -> dict[str, set[str]]:
    """module -> the cifarkit modules it imports (dotted, under cifarkit)."""
    out = {}
    for p in sorted(SRC.rglob("*.py")):
        parts = p.relative_to(SRC).with_suffix("").parts
        mod = ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)
        package = list(parts[:-1])
        tree = ast.parse(p.read_text())
        nodes = tree.body if top_level_only else ast.walk(tree)
        targets = set()
        for node in nodes:
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package[:len(package) - (node.level - 1)]
                if node.module:
                    targets.add(".".join(base + [node.module]))
                else:  # from . import a, b: modules of that package
                    targets |= {".".join(base + [a.name]) for a in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cifarkit."):
                targets.add(node.module.removeprefix("cifarkit."))
        out[mod] = targets
    return out


def test_every_module_belongs_to_a_layer():
    for mod in _imports():
        _layer(mod)  # StopIteration: a module outside the declared layers


def test_no_import_runs_from_a_lower_layer_to_a_higher_one():
    upward = [f"{m} -> {t}" for m, ts in _imports().items() for t in ts if _layer(t) > _layer(m)]
    assert not upward, upward


def test_the_contracts_at_the_root_import_only_those_below_them():
    root = {m: ts for m, ts in _imports().items() if _layer(m) == 0}
    for m, ts in root.items():
        for t in ts:
            assert _layer(t) == 0 and ROOT_ORDER.index(t) < ROOT_ORDER.index(m), f"{m} -> {t}"


def test_no_module_imports_itself_back_at_import_time():
    graph = _imports(top_level_only=True)
    seen, stack = set(), []

    def visit(m):
        if m in stack:
            raise AssertionError(" -> ".join(stack[stack.index(m):] + [m]))
        if m in seen or m not in graph:
            return
        stack.append(m)
        for t in graph[m]:
            visit(t)
        stack.pop()
        seen.add(m)

    for m in graph:
        visit(m)


def test_each_subpackage_says_what_it_owns_and_may_import():
    for pkg in ("data", "train", "trust", "report", "sweep", "serve"):
        doc = ast.get_docstring(ast.parse((SRC / pkg / "__init__.py").read_text()))
        assert doc and "May import" in doc, pkg
