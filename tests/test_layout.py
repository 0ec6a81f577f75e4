"""The code's shape, checked: no import circle between flowmo's modules, flowmo imports inside functions only where
they keep a command's --help fast, flowmo.nn pure torch, files a reader can hold in mind, a README a newcomer reads
in five minutes."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "flowmo"
MAX_FILE_LINES = 400
MAX_README_LINES = 200


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(SRC.rglob("*.py"))}


def imported_modules(node: ast.AST, importer: str) -> list[str]:
    """flowmo modules an import statement loads: `from flowmo.a import b` is flowmo.a, or flowmo.a.b if b is one."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name in MODULES]
    if not isinstance(node, ast.ImportFrom) or node.module is None or node.level:
        return []
    submodules = [f"{node.module}.{alias.name}" for alias in node.names if f"{node.module}.{alias.name}" in MODULES]
    names_only_submodules = len(submodules) == len(node.names)  # `from flowmo.generate import masking`
    return submodules + ([node.module] if node.module in MODULES and not names_only_submodules else [])


def import_graph() -> dict[str, set[str]]:
    """Every import, at module level or inside a function: a circle closed by a lazy import is still a circle."""
    graph = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text())
        graph[name] = {target for node in ast.walk(tree) for target in imported_modules(node, name) if target != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return stack[stack.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_circle_and_accepts_a_tree():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_circle_between_flowmo_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_flowmo_imports_inside_functions_only_in_commands():
    """A command's run() imports its work lazily, so `flowmo COMMAND --help` answers before torch loads; anywhere
    else a flowmo import inside a function hides a dependency (or a circle)."""
    lazy = []
    for name, path in MODULES.items():
        if name.startswith("flowmo.commands"):
            continue
        for function in ast.walk(ast.parse(path.read_text())):
            if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lazy += [
                    f"{path.relative_to(ROOT)}:{node.lineno}"
                    for node in ast.walk(function)
                    if imported_modules(node, name)
                ]
    assert not lazy, f"flowmo imports inside functions outside flowmo/commands: {lazy}"


# flowmo.nn is pure torch: the network, no file, download or Lightning code. What it may use of the rest of flowmo is
# this short list of modules that need only the standard library, torch and each other (the config, its presets, the
# samplers' maths, the authors' key names, UserError); loading and saving weights live in flowmo.checkpoint/hub.
NN_MAY_USE = {"flowmo.config", "flowmo.errors", "flowmo.flow", "flowmo.official", "flowmo.presets"}
PURE_PACKAGES = {"torch", "einops"}


def in_nn(name: str) -> bool:
    return name == "flowmo.nn" or name.startswith("flowmo.nn.")


def nn_leaks(graph: dict[str, set[str]]) -> list[str]:
    """Imports, from flowmo.nn or from the modules it may use, of a flowmo module outside both."""
    importers = sorted(name for name in graph if in_nn(name) or name in NN_MAY_USE)
    return [
        f"{name} -> {target}"
        for name in importers
        for target in sorted(graph[name])
        if not in_nn(target) and target not in NN_MAY_USE
    ]


def third_party_imports(path: Path) -> set[str]:
    """Top-level packages a module imports, at module level or inside a function, beyond flowmo and the stdlib."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names - {"flowmo"} - set(sys.stdlib_module_names)


def test_the_nn_leak_finder_finds_a_loader_behind_an_allowed_module():
    graph = {
        "flowmo.nn.tokenizer": {"flowmo.nn.layers", "flowmo.flow", "flowmo.hub"},
        "flowmo.nn.layers": set(),
        "flowmo.flow": {"flowmo.checkpoint"},
        "flowmo.hub": {"flowmo.pretrained"},
    }
    assert nn_leaks(graph) == ["flowmo.flow -> flowmo.checkpoint", "flowmo.nn.tokenizer -> flowmo.hub"]


def test_nn_is_pure_torch():
    """No module under src/flowmo/nn/ imports a flowmo module outside flowmo.nn but the pure ones of NN_MAY_USE,
    and nothing it reaches imports a package beyond the standard library, torch and einops."""
    assert not nn_leaks(import_graph()), "flowmo.nn reaches beyond pure torch: " + ", ".join(nn_leaks(import_graph()))
    reached = [path for name, path in MODULES.items() if in_nn(name) or name in NN_MAY_USE]
    packages = {str(path.relative_to(ROOT)): sorted(third_party_imports(path) - PURE_PACKAGES) for path in reached}
    assert not any(packages.values()), {path: names for path, names in packages.items() if names}


def test_no_source_file_over_400_lines():
    long = {
        str(path.relative_to(ROOT)): n
        for path in MODULES.values()
        if (n := len(path.read_text().splitlines())) > MAX_FILE_LINES
    }
    assert not long, long


def test_the_training_module_takes_a_handful_of_typed_groups():
    """FlowMoModule's settings come in groups (loss, optim, init, eval: flowmo.settings), not dozens of flat knobs."""
    import inspect

    from flowmo.module import FlowMoModule

    parameters = [name for name in inspect.signature(FlowMoModule.__init__).parameters if name != "self"]
    assert len(parameters) <= 12, parameters
    assert {"loss", "optim", "init", "eval"} <= set(parameters)


def test_the_readme_is_a_short_guide():
    assert len((ROOT / "README.md").read_text().splitlines()) <= MAX_README_LINES


def test_the_repository_stands_alone():
    """The method is described in docs/method.md: code, configs and docs cite its sections ("method §3"), never a
    file outside the repository."""
    import re

    outside = re.compile(r"\.\./shared|\bspec(ification)? (sections? )?\d|FLOWMO\.md", re.IGNORECASE)
    files = [*SRC.rglob("*.py"), *(ROOT / "configs").rglob("*.yaml"), *(ROOT / "docs").glob("*.md")]
    files += [ROOT / "README.md", ROOT / "Makefile"]
    cited = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in files
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if outside.search(line)
    ]
    assert not cited, cited
    assert (ROOT / "docs" / "method.md").is_file()
