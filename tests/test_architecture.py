"""The package's floors: each module imports only from its own floor or below, the import graph has no
cycle, and mimkit modules are imported at the top of a file (an import inside a function is kept for
optional third-party packages only). Read from the source with `ast`, so the check needs no import."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mimkit"

# floor of each module (dotted name under mimkit); a package's modules share its floor unless listed
FLOORS = {
    # runtime: processes, precision, config, files, data pipelines, the optimizer-step engine
    "errors": 0, "version": 0, "registry": 0, "extras": 0, "logs": 0, "sources": 0, "datasets": 0, "config": 0, "typed_config": 0, "presets": 0, "files": 0, "checkpoint": 0, "distributed": 0, "engine": 0, "loop": 0,
    "machine": 0, "metrics": 0, "runs": 0, "schedules": 0, "data": 0, "device_decode": 0, "pipeline": 0,
    # nn parts: encoders, decoders, masks, targets and losses, tokenizers
    "models": 1, "decoders": 1, "masking": 1, "losses": 1, "targets": 1, "teachers": 1, "tokenizers": 1,
    # methods: presets of parts behind one contract
    "methods": 2,
    # io: import / export formats
    "interop": 3,
    # tasks: pretraining, evaluation, pictures, tokenizer training
    "train": 4, "eval": 4, "visualize": 4, "tokenizer_training": 4, "report": 4, "compare": 4,
    # the command line and the package's front door
    "cli": 5, "__init__": 5,
}  # fmt: skip
FLOOR_NAMES = ["runtime", "nn", "methods", "io", "tasks", "cli"]


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"] or ["__init__"]
    return ".".join(parts)


def floor_of(name: str) -> int:
    head = name.split(".")[0]
    if head not in FLOORS:
        raise AssertionError(f"mimkit.{name} has no floor: add it to FLOORS in {__file__}")
    return FLOORS[head]


def imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported mimkit module, line, inside a function) for every import of a mimkit module in the file."""
    tree = ast.parse(path.read_text(), str(path))
    found = []

    def visit(node, in_function: bool):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            targets = []
            if isinstance(child, ast.Import):
                targets = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                targets = [child.module] + [f"{child.module}.{a.name}" for a in child.names]
            for t in targets:
                if t == "mimkit":  # `import mimkit`, `from mimkit import name`: the package's __init__ (cli floor),
                    # unless every name imported is a module (`from mimkit import distributed`): those modules count
                    if isinstance(child, ast.Import) or any(not _is_module(a.name) for a in child.names):
                        found.append(("__init__", child.lineno, in_function))
                    continue
                if not t.startswith("mimkit."):
                    continue
                name = t[len("mimkit.") :]
                if (PACKAGE / (name.replace(".", "/") + ".py")).exists() or (PACKAGE / name.replace(".", "/")).is_dir():
                    found.append((name, child.lineno, in_function))
            visit(child, inner)

    visit(tree, False)
    return found


def _is_module(name: str) -> bool:
    return (PACKAGE / f"{name}.py").exists() or (PACKAGE / name).is_dir()


def graph() -> dict[str, list[tuple[str, int, bool]]]:
    return {module_name(p): imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_module_imports_only_its_own_floor_or_below():
    upward = []
    for module, deps in graph().items():
        for dep, line, _ in deps:
            if floor_of(dep) > floor_of(module):
                upward.append(f"mimkit.{module}:{line} ({FLOOR_NAMES[floor_of(module)]}) imports mimkit.{dep} "
                              f"({FLOOR_NAMES[floor_of(dep)]})")  # fmt: skip
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_the_import_graph_has_no_cycle():
    edges = {m: sorted({d for d, _, _ in deps if d != m and not m.startswith(d + ".")}) for m, deps in graph().items()}
    # a package's __init__ importing its own modules is not a cycle with them
    state, stack, cycles = {}, [], []

    def resolve(d):
        return d if d in edges else next((m for m in edges if m == d.rsplit(".", 1)[0]), d)

    def dfs(m):
        state[m] = 1
        stack.append(m)
        for d in edges.get(m, []):
            d = resolve(d)
            if d not in edges or d == m:
                continue
            if state.get(d) == 1 and not (d.startswith(m + ".") or m.startswith(d + ".")):
                cycles.append(" -> ".join(stack[stack.index(d) :] + [d]))
            elif d not in state:
                dfs(d)
        stack.pop()
        state[m] = 2

    for m in edges:
        if m not in state:
            dfs(m)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_mimkit_modules_are_imported_at_the_top_of_a_file():
    inside = [f"mimkit/{m.replace('.', '/')}: line {line} imports mimkit.{dep} inside a function"
              for m, deps in graph().items() for dep, line, in_function in deps if in_function]  # fmt: skip
    assert not inside, "\n".join(inside)


@pytest.mark.parametrize("bad", ["upward", "cycle"])
def test_the_checks_catch_a_violation(bad, tmp_path, monkeypatch):
    """The walk really sees imports: a planted upward import / cycle is reported."""
    fake = tmp_path / "mimkit"
    (fake / "methods").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "methods" / "__init__.py").write_text("")
    (fake / "config.py").write_text("from mimkit.methods import x\n" if bad == "upward" else "import mimkit.models\n")
    (fake / "models.py").write_text("import mimkit.config\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    with pytest.raises(AssertionError, match="upward imports" if bad == "upward" else "import cycles"):
        (
            test_every_module_imports_only_its_own_floor_or_below
            if bad == "upward"
            else test_the_import_graph_has_no_cycle
        )()
