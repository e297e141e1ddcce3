"""The shape of the code: which package may import which, no import cycles, and one table of methods."""

import ast
from pathlib import Path

from offline_quantize.methods import METHODS
from offline_quantize.methods.registry import markdown_table

from .conftest import ROOT

# Installed package name -> its folder.
PACKAGES = {
    "aaac_kernels": ROOT / "kernels",
    "aaac_vllm": ROOT / "aaac_vllm",
    "offline_quantize": ROOT / "offline_quantize",
}


def _modules() -> dict[str, Path]:
    modules = {}
    for package, folder in PACKAGES.items():
        for file in folder.rglob("*.py"):
            parts = [package, *file.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = file
    return modules


def _import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports anywhere in its body (function-level imports included)."""
    modules = _modules()
    graph = {}
    for name, file in modules.items():
        package = name if file.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    base = f"{anchor}.{base}" if base else anchor
                # `from package import module` imports the module; `from module import name` the module.
                targets.update(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def test_the_format_and_the_serving_side_never_import_the_quantizer():
    for name, targets in _import_graph().items():
        if not name.startswith("offline_quantize"):
            assert not [t for t in targets if t.startswith("offline_quantize")], f"{name} imports the quantizer"
        if name.startswith("aaac_kernels"):
            assert not [t for t in targets if t.startswith("aaac_vllm")], f"{name} imports the vLLM backend"
        if name.startswith("aaac_kernels.format"):  # the format is the math and the files, not the kernels
            assert all(t.startswith("aaac_kernels.format") for t in targets), f"{name} imports {targets}"


def test_no_import_cycles():
    graph = _import_graph()
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                cycle = path[path.index(target) :] + [target]
                raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            if target not in state:
                visit(target, [*path, target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_the_graph_sees_imports():
    """Guards the two tests above against a walker that finds nothing."""
    graph = _import_graph()
    assert "aaac_kernels.format.verify" in graph["aaac_vllm.config"]
    assert "offline_quantize.methods.registry" in graph["offline_quantize.methods.aaac"]
    assert "aaac_kernels.format.layout" in graph["aaac_kernels.format.reference"]


def test_every_method_module_registers_one_method():
    folder = PACKAGES["offline_quantize"] / "methods"
    modules = {f.stem for f in folder.glob("*.py")} - {"__init__", "registry"}
    assert {type(m).__module__.rpartition(".")[2] for m in METHODS.values()} == modules
    assert len(METHODS) == len(modules)


def test_docs_table_of_methods_is_the_registry():
    assert markdown_table() in (ROOT / "docs" / "method.md").read_text(), (
        "docs/method.md's table of methods differs from the registry: paste "
        "`python -c 'from offline_quantize.methods.registry import markdown_table; print(markdown_table())'`"
    )
