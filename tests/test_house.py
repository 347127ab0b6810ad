"""The house rules, checked on every run of the suite (no process started, about a second):

- packages import downward only (LAYERS), imports inside functions included, and no two modules import each
  other, directly or round a longer cycle;
- every package's docstring lists exactly the modules in its folder;
- no function in hvdlm/ is longer than 60 lines, and none but click commands takes more than 7 parameters;
- outside hvdlm/optim nothing asks an optimizer what it is (isinstance, hasattr, getattr): it asks the interface;
- ruff's rules in pyproject.toml hold (argument count, statements, branches, complexity, style).
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "hvdlm"

# Top to bottom: a package or top-level module may import only from layers below its own. Members of one layer
# are independent of each other.
LAYERS = [
    ["hvdlm.__main__"],
    ["hvdlm.cli"],
    ["hvdlm.training"],
    ["hvdlm.launch", "hvdlm.watch"],
    ["hvdlm.optim"],
    ["hvdlm.checkpoint", "hvdlm.plan"],
    ["hvdlm.model", "hvdlm.data"],
    ["hvdlm.config"],
    ["hvdlm.parallel"],
    ["hvdlm.runfiles", "hvdlm.devices", "hvdlm.cache"],
    ["hvdlm.errors", "hvdlm.fsutil", "hvdlm.units", "hvdlm"],  # "hvdlm": the package's own __init__ (__version__)
]
# Module cycles that are meant, each with why: none.
ALLOWED_CYCLES: dict[frozenset[str], str] = {}
MAX_LINES, MAX_PARAMETERS = 60, 7


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
TREES = {name: ast.parse(path.read_text(), str(path)) for name, path in MODULES.items()}


def imported(name: str) -> set[str]:
    """The hvdlm modules `name` imports anywhere in its text (module level or inside functions)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(TREES[name]):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            candidates = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for candidate in candidates:
            while candidate and candidate not in MODULES:
                candidate = candidate.rpartition(".")[0]
            if candidate.startswith("hvdlm") and candidate != name:
                found.add(candidate)
                break  # the most specific module the import names
    return found


GRAPH = {name: imported(name) for name in MODULES}


def unit_of(module: str) -> str:
    """The package directly under hvdlm (or the top-level module) that holds `module`."""
    parts = module.split(".")
    if len(parts) == 1:
        return "hvdlm"
    return ".".join(parts[:2])


def layer_of(unit: str) -> int:
    for i, members in enumerate(LAYERS):
        if unit in members:
            return i
    raise AssertionError(f"{unit} is in no layer of tests/test_house.py's LAYERS: place it where it belongs")


def test_every_package_imports_only_from_below():
    upward = sorted(
        f"{a} imports {b}"
        for a, targets in GRAPH.items()
        for b in targets
        if unit_of(a) != unit_of(b) and layer_of(unit_of(b)) <= layer_of(unit_of(a))
    )
    assert not upward, "imports that do not run downward:\n" + "\n".join(upward)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph.get(nxt, ())))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def test_no_import_cycles_between_modules_or_packages():
    modules = [c for c in cycles(GRAPH) if frozenset(c) not in ALLOWED_CYCLES]
    units: dict[str, set[str]] = defaultdict(set)
    for a, targets in GRAPH.items():
        units[unit_of(a)] |= {unit_of(b) for b in targets if unit_of(b) != unit_of(a)}
    assert not modules, f"modules that import each other: {modules}"
    assert not cycles(dict(units)), f"packages that import each other: {cycles(dict(units))}"


def test_the_cycle_finder_finds_a_cycle():
    # The checks above pass on an empty answer: the finder must see a real cycle, and no cycle in a chain.
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


PACKAGES = sorted({p.parent for p in PACKAGE.rglob("__init__.py")})


@pytest.mark.parametrize("folder", PACKAGES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_package_docstring_lists_its_modules(folder: Path):
    """The docstring's list ("- name, name: what they do", one entry a line) names every module of the folder
    (and subpackage) once, and nothing else."""
    doc = ast.get_docstring(TREES[module_name(folder / "__init__.py")]) or ""
    listed = [n.strip() for line in re.findall(r"^- ([\w, ]+):", doc, re.M) for n in line.split(",")]
    present = sorted(
        p.stem if p.is_file() else p.name
        for p in folder.iterdir()
        if (p.suffix == ".py" and p.name != "__init__.py") or (p / "__init__.py").is_file()
    )
    assert sorted(listed) == present, f"{folder}: the docstring lists {sorted(listed)}, the folder has {present}"


def functions():
    for name, tree in TREES.items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield name, node


def body_lines(node: ast.FunctionDef) -> int:
    """Lines from the first statement after the docstring to the last."""
    body = node.body
    if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) and len(body) > 1:
        body = body[1:]
    return body[-1].end_lineno - body[0].lineno + 1


def is_click_command(node: ast.FunctionDef) -> bool:
    return any(re.search(r"\b(command|group)\b", ast.unparse(d)) for d in node.decorator_list)


def test_functions_are_short_and_narrow():
    long = [f"{m}.{f.name} ({body_lines(f)} lines)" for m, f in functions() if body_lines(f) > MAX_LINES]
    wide = []
    for m, f in functions():
        a = f.args
        named = [x for x in a.posonlyargs + a.args + a.kwonlyargs if x.arg not in ("self", "cls")]
        if len(named) > MAX_PARAMETERS and not is_click_command(f):
            wide.append(f"{m}.{f.name} ({len(named)} parameters)")
    assert not long, f"functions over {MAX_LINES} lines: {long}"
    assert not wide, f"functions over {MAX_PARAMETERS} parameters: {wide}"


OPTIMIZER_WORDS = re.compile(r"optim|zero|adam|sgd|muon|replicated", re.I)


def test_only_optim_asks_an_optimizer_what_it_is():
    """isinstance against an optimizer class, or hasattr / getattr on something named like an optimizer, outside
    hvdlm/optim: that is what the interface (hvdlm.optim.interface) is for."""
    probes = []
    for name, tree in TREES.items():
        if name.startswith("hvdlm.optim"):
            continue
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.args):
                continue
            if node.func.id == "isinstance" and len(node.args) == 2:
                subject = ast.unparse(node.args[1])
            elif node.func.id in ("hasattr", "getattr"):
                subject = ast.unparse(node.args[0])
            else:
                continue
            if OPTIMIZER_WORDS.search(subject):
                probes.append(f"{name}:{node.lineno}: {ast.unparse(node)}")
    assert not probes, "optimizer kinds probed outside hvdlm/optim:\n" + "\n".join(probes)


def test_ruff_keeps_the_house_rules():
    """pyproject.toml's rules (argument count, statements, branches, complexity among them) over the code."""
    done = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", "hvdlm", "tests", "bench"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    formatted = subprocess.run(
        [sys.executable, "-m", "ruff", "format", "--check", "--no-cache", "hvdlm", "tests", "bench"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert formatted.returncode == 0, formatted.stdout + formatted.stderr
