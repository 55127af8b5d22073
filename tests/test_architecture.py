"""The package's shape, checked from the source with `ast`: no import cycle, and no module imports
a layer above its own (docs/architecture.md draws the layers)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "autoquant"

# Lower numbers sit lower: a module may import its own package and any package of a lower layer.
# The tools (layer 6) may use each other; other packages of one layer may not.
LAYERS = {
    "core": 0,
    "models": 1,
    "store": 1,
    "backends": 2,
    "probe": 3,
    "planner": 4,
    "execute": 5,
    "cli": 6,
    "serve": 6,
    "bench": 6,
}
TOOLS = 6


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(path: Path, modules: dict[str, Path], *, runtime_only: bool) -> set[str]:
    """The project modules ``path`` imports, at any depth (functions included). With
    ``runtime_only``, imports under ``if TYPE_CHECKING:`` are left out."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if runtime_only and isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "autoquant")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            if base.split(".")[0] == "autoquant":
                for alias in node.names:
                    child = f"{base}.{alias.name}"
                    found.add(child if child in modules else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return {m for m in found if m in modules and m != name}


def _with_parents(module: str, importer: str) -> set[str]:
    """Importing a.b.c from outside a.b runs a.b's __init__ first (the root's is lazy and left
    out); from inside a.b that __init__ is already running."""
    parts = module.split(".")
    chain = {".".join(parts[:i]) for i in range(2, len(parts) + 1)}
    return {p for p in chain if p == module or not (importer + ".").startswith(p + ".")}


def _runtime_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets: set[str] = set()
        for imported in _imports(path, modules, runtime_only=True):
            targets |= _with_parents(imported, name)
        targets.discard(name)
        graph[name] = {t for t in targets if t in modules}
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return [*stack[stack.index(target) :], target]
            if target not in state:
                cycle = walk(target)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = walk(node)
            if cycle:
                return cycle
    return None


def _package_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_walk_sees_function_level_and_package_imports() -> None:
    graph = _runtime_graph()
    # cli.main imports the serve command inside a function, and that runs serve/__init__.
    assert "autoquant.serve.command" in graph["autoquant.cli.main"]
    assert "autoquant.serve" in graph["autoquant.cli.main"]


def test_no_import_cycle_among_the_modules() -> None:
    cycle = _find_cycle(_runtime_graph())
    assert cycle is None, " -> ".join(cycle or [])


def test_every_package_has_a_layer() -> None:
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert packages - {"profiles"} == set(LAYERS)


@pytest.mark.parametrize("module", sorted(_modules()))
def test_no_module_imports_a_layer_above_its_own(module: str) -> None:
    modules = _modules()
    own = _package_of(module)
    if own is None:
        return  # autoquant/__init__ and __main__: the public facade sits on top of everything
    bad = []
    for imported in _imports(modules[module], modules, runtime_only=False):
        other = _package_of(imported)
        if other is None or other == own:
            continue
        if LAYERS[other] > LAYERS[own] or (LAYERS[other] == LAYERS[own] != TOOLS):
            bad.append(imported)
    assert not bad, f"{module} ({own}, layer {LAYERS[own]}) imports {bad}"


def test_the_command_line_needs_no_optional_extra() -> None:
    """`autoquant --help`, `plan`, `run`, … build their parser (serve's and bench's included)
    without the serve extra or any quantization backend installed."""
    import subprocess
    import sys

    blocked = ("pydantic", "fastapi", "uvicorn", "httpx", "bitsandbytes", "optimum", "torchao")
    code = (
        "import sys\n"
        f"for name in {blocked!r}: sys.modules[name] = None  # import fails as if not installed\n"
        "from autoquant.cli.main import build_parser\n"
        "build_parser().parse_args(['plan', '--help'])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=PACKAGE.parent
    )
    assert done.returncode == 0, done.stderr[-1500:]
    assert "usage: autoquant plan" in done.stdout
