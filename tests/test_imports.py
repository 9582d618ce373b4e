"""The package's import graph, read from the source (every import statement, those inside functions included):
no module imports itself back through others, and the low layers (models/, data/) never import the layers above
them that orchestrate (validate, publish, driver, cli)."""
import ast
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "se_compress"
TOP_LAYERS = ("se_compress.validate", "se_compress.publish", "se_compress.driver", "se_compress.cli")
LOW_LAYERS = ("se_compress.models", "se_compress.data")


def module_name(file: Path) -> str:
    parts = list(file.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the se_compress modules it imports anywhere in its source."""
    modules = {module_name(f): f for f in PACKAGE.rglob("*.py")}
    graph = {}
    for name, file in modules.items():
        package = name if file.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(file.read_text(), str(file))):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in node.names:  # `from pkg import module` imports the module; `from pkg import name`, pkg
                    sub = f"{base}.{alias.name}"
                    targets.add(sub if sub in modules else base)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_reads_function_level_imports():
    graph = import_graph()
    # driver imports the placement inside a function, compare imports eval.run inside one: both are edges
    assert "se_compress.models.placement" in graph["se_compress.driver"]
    assert "se_compress.eval.run" in graph["se_compress.compare"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_package_has_no_import_cycle():
    assert cycles(import_graph()) == []


def test_models_and_data_never_import_the_layers_above():
    graph = import_graph()
    upward = sorted((source, target) for source, targets in graph.items() if source.startswith(LOW_LAYERS)
                    for target in targets if target.startswith(TOP_LAYERS))
    assert upward == []
