"""The package's import graph has no cycles, counting imports inside functions too, and data
flows one way through the layers: a module imports only modules of its own layer or below."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "torchq"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _targets(module: str, path: Path, node: ast.AST, modules: dict[str, Path]) -> list[str]:
    """torchq modules an import statement of ``module`` names (the deepest existing one)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        if node.level:
            base = base[: len(base) - (node.level - 1)]
            prefix = ".".join(base + ([node.module] if node.module else []))
        else:
            prefix = node.module or ""
        names = [f"{prefix}.{alias.name}" for alias in node.names]
    out = []
    for name in names:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        if name.startswith("torchq") and name != module:
            out.append(name)
    return out


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {}
    for module, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                deps.update(_targets(module, path, node, modules))
        graph[module] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


#: (module-name pattern, layer), first match wins: ``*`` is one name component, a trailing
#: ``**`` any number of them (none included), ``formats.<folder>`` a format folder.
#: A format folder (``formats/<name>/``) is one format's whole story, so its modules sit
#: in the layer of what they are: the tensor in formats, the reference kernel in kernels,
#: the config and handler in the quantize API (the folder's ``__init__`` with them).
#: ``integrations`` (transformers glue) sits below ``interop``, whose ``from_pretrained``
#: builds transformers models through it.
LAYERS = [
    ("torchq._version", 0),
    ("torchq._compile_cache", 0),
    ("torchq.errors", 0),
    ("torchq.memory", 0),
    ("torchq.primitives.**", 1),
    ("torchq.formats.*.tensor", 2),
    ("torchq.formats.*.init_ops", 2),
    ("torchq.formats.*.reference", 3),
    ("torchq.formats.*.config", 4),
    ("torchq.formats.*.handler", 4),
    ("torchq.formats.<folder>", 4),
    ("torchq.formats.**", 2),
    ("torchq.kernels.**", 3),
    ("torchq.quantize.**", 4),
    ("torchq.algorithms.**", 5),
    ("torchq.integrations.**", 6),
    ("torchq.interop.**", 7),
    ("torchq.runtime.**", 7),
    ("torchq.apps.**", 9),
    ("torchq", 10),
]


def _matches(parts: list[str], pattern: str) -> bool:
    pat = pattern.split(".")
    if pat[-1] == "**":
        return parts[: len(pat) - 1] == pat[:-1]
    if len(parts) != len(pat):
        return False
    for name, want in zip(parts, pat):
        if want == "<folder>":
            if not (PACKAGE / "formats" / name).is_dir():
                return False
        elif want not in ("*", name):
            return False
    return True


def layer_of(module: str) -> int:
    parts = module.split(".")
    for pattern, layer in LAYERS:
        if _matches(parts, pattern):
            return layer
    raise AssertionError(f"{module} is in no layer: add it to LAYERS (or move it into a layer's folder)")


def upward_imports(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    return sorted((m, d) for m, deps in graph.items() for d in deps if layer_of(d) > layer_of(m))


def test_data_flows_one_way_through_the_layers():
    assert upward_imports(import_graph()) == []


def test_the_layer_check_sees_an_upward_import():
    assert layer_of("torchq.formats.affine.tensor") == 2
    assert layer_of("torchq.formats.affine.config") == 4
    assert layer_of("torchq.formats.dispatch") == 2
    assert layer_of("torchq.formats.codebook4") == 4
    assert layer_of("torchq.primitives") == 1
    assert upward_imports({"torchq.formats.base": {"torchq.quantize.api"}}) == [("torchq.formats.base", "torchq.quantize.api")]


def test_top_level_holds_only_the_public_api_and_infrastructure():
    top = sorted(p.stem for p in PACKAGE.glob("*.py"))
    assert top == ["__init__", "_compile_cache", "_version", "errors", "memory"], top


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_the_checker_sees_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_primitives_depend_on_nothing_else_in_torchq():
    graph = import_graph()
    for module, deps in graph.items():
        if module.startswith("torchq.primitives"):
            assert all(d.startswith("torchq.primitives") for d in deps), (module, deps)


def test_function_level_imports_count():
    graph = import_graph()
    assert "torchq.kernels.cpu_ext" in graph["torchq.kernels.hugepages"]  # imported inside enabled()
