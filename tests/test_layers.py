"""The import layers of the Python package: entrances > api > run > planning and measuring > native > base. A
module imports only from its own layer or below (lazy imports inside functions included), and no import cycle
exists anywhere. The rule keeps the run path one direction: what sits higher is never reached back."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "orchestrator"

# Highest first. A module belongs to the first entry one of whose prefixes it starts with.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("entrances", ("orchestrator.cli", "orchestrator.server", "orchestrator.llama_server", "orchestrator.front_door",
                   "orchestrator.chat", "orchestrator.bench", "orchestrator.__main__")),
    ("api", ("orchestrator.api",)),
    ("run", ("orchestrator.run", "orchestrator.speculative", "orchestrator.exact", "orchestrator.tools")),
    ("plan and measure", ("orchestrator.planner", "orchestrator.sidecar", "orchestrator.traces",
                          "orchestrator.overheads", "orchestrator.rpc", "orchestrator.readspeed",
                          "orchestrator.computespeed", "orchestrator.doctor", "orchestrator.synth")),
    ("native", ("orchestrator.native", "orchestrator.llamacpp", "orchestrator.build")),
    ("base", ("orchestrator.errors", "orchestrator.sizes", "orchestrator.paths", "orchestrator.fsutil",
              "orchestrator.gitutil", "orchestrator.modes", "orchestrator.config", "orchestrator.endpoints",
              "orchestrator.cpufeatures", "orchestrator.modelfile", "orchestrator.patches", "orchestrator.vendor",
              "orchestrator.plotting")),
]


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _imports(path: Path) -> set[str]:
    """orchestrator modules `path` imports anywhere (functions included), except under `if TYPE_CHECKING:`."""
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("orchestrator")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("orchestrator"):
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                out.add(full if full in MODULES else node.module)
    return {m for m in out if m in MODULES}


GRAPH = {name: _imports(path) - {name} for name, path in MODULES.items()}


def layer_of(module: str) -> int:
    """The module's layer, 0 = the highest."""
    for i, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    raise AssertionError(f"{module} is in no layer: add it to LAYERS in {Path(__file__).name}")


def test_every_module_has_a_layer():
    for name in MODULES:
        if name != "orchestrator":  # the package itself re-exports the API for `import orchestrator as ff`
            layer_of(name)


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m != "orchestrator"))
def test_no_module_imports_from_a_higher_layer(module):
    mine = layer_of(module)
    up = sorted(m for m in GRAPH[module] if m != "orchestrator" and layer_of(m) < mine)
    assert not up, f"{module} ({LAYERS[mine][0]}) imports {', '.join(up)} from a higher layer"


def test_there_is_no_import_cycle():
    seen: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(module: str) -> None:
        seen[module] = 1
        path.append(module)
        for dep in sorted(GRAPH[module]):
            if seen.get(dep) == 1:
                cycle = path[path.index(dep):] + [dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in seen:
                visit(dep)
        path.pop()
        seen[module] = 2

    for module in sorted(GRAPH):
        if module not in seen:
            visit(module)
