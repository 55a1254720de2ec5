"""The layering rules of the code base, checked on the imports (ast) of every module.

Function-level imports count like module-level ones: a lazy import still ties two modules.
The rules (README "Layout"):
- `model` never imports `server`;
- `server.http` imports nothing of ours outside `server.http`;
- only `server.serve` and `server.cli` reach `model.engine` and `model.hub`;
- inside `model`: leaves (errors, sampling_params, config) <- text, layers <- models,
  sample <- engine; hub stands apart;
- the scheduler, the block manager and the sequence import no torch;
- no import circles.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("server", "model")

# The model sub-layers each layer may import (besides itself).
MODEL_LEAVES = {"model.errors", "model.sampling_params", "model.config"}
MODEL_LAYERS_MAY_IMPORT = {
    "leaves": set(),
    "text": {"leaves"},
    "layers": {"leaves"},
    "models": {"leaves", "layers"},
    "sample": {"leaves", "structured"},
    "engine": {"leaves", "text", "layers", "models", "sample", "structured"},
    "hub": {"leaves"},
    "structured": {"leaves"},
}
TORCH_FREE = (
    "model.engine.scheduler",
    "model.engine.block_manager",
    "model.engine.sequence",
    "model.structured.compiler",
    "model.structured.matcher",
)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {
        module_name(path): path for package in PACKAGES for path in (ROOT / package).rglob("*.py")
    }


MODULES = all_modules()


def imports_of(path: Path) -> set[str]:
    """Every module `path` imports, at any depth of its code (our modules and third-party ones).

    Relative imports are resolved against the module's package, so they count too."""
    found: set[str] = set()
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package.pop()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            for alias in node.names:
                submodule = f"{module}.{alias.name}"
                found.add(submodule if submodule in MODULES else module)
    return found


GRAPH = {name: imports_of(path) for name, path in MODULES.items()}


def ours(names: set[str]) -> set[str]:
    return {n for n in names if n.split(".")[0] in PACKAGES}


def model_layer(name: str) -> str:
    if name in MODEL_LEAVES:
        return "leaves"
    parts = name.split(".")
    assert len(parts) >= 2 and parts[1] in MODEL_LAYERS_MAY_IMPORT, f"{name} is in no layer"
    return parts[1]


def violations(rule) -> list[str]:
    return sorted(
        f"{name} imports {dep}"
        for name, deps in GRAPH.items()
        for dep in ours(deps)
        if rule(name, dep)
    )


def test_every_module_is_in_the_graph():
    assert "server.http.connection" in GRAPH and "model.engine.llm_engine" in GRAPH
    assert all(name.startswith(PACKAGES) for name in GRAPH)


def test_model_never_imports_server():
    assert violations(lambda m, d: m.startswith("model") and d.startswith("server")) == []


def test_http_imports_nothing_else_of_ours():
    def rule(m: str, d: str) -> bool:
        return m.startswith("server.http") and not (
            d == "server.http" or d.startswith("server.http.")
        )

    assert violations(rule) == []


def test_only_the_entry_points_reach_engine_and_hub():
    entry_points = {"server.serve", "server.cli"}

    def rule(m: str, d: str) -> bool:
        return (
            m.startswith("server")
            and m not in entry_points
            and d.startswith(("model.engine", "model.hub"))
        )

    assert violations(rule) == []


# What the API layer may import of model: torch-free modules only (the leaves and the
# structured-output compiler).
API_MAY_IMPORT = ("model.errors", "model.sampling_params", "model.config", "model.structured")


def test_api_imports_only_torch_free_model_modules():
    def rule(m: str, d: str) -> bool:
        return (
            m.startswith("server.api")
            and d.startswith("model")
            and not any(d == a or d.startswith(a + ".") for a in API_MAY_IMPORT)
        )

    assert violations(rule) == []


def test_model_layers_point_one_way():
    def rule(m: str, d: str) -> bool:
        if not (m.startswith("model.") and d.startswith("model.")) or d == "model":
            return False
        layer, dep_layer = model_layer(m), model_layer(d)
        return dep_layer != layer and dep_layer not in MODEL_LAYERS_MAY_IMPORT[layer]

    assert violations(rule) == []


@pytest.mark.parametrize("name", TORCH_FREE)
def test_scheduling_modules_import_no_torch(name):
    seen, todo = set(), [name]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        deps = GRAPH.get(current, set())
        assert "torch" not in {d.split(".")[0] for d in deps}, f"{current} imports torch"
        todo.extend(ours(deps))


def test_no_import_circles():
    circles = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        path.append(name)
        for dep in sorted(ours(GRAPH.get(name, set()))):
            if dep not in GRAPH:
                continue
            if state.get(dep) == 1:
                circles.append(" -> ".join([*path[path.index(dep) :], dep]))
            elif dep not in state:
                visit(dep)
        path.pop()
        state[name] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name)
    assert circles == []
