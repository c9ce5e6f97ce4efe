"""The package's shape, checked: no module over 600 lines, no import cycle, nothing that
imports upward (a layer uses only the layers under it), and the hook's start-up loads the
modules it did and no others. Read from the source with ``ast``: every import counts,
those inside functions too, but for the ones a type checker alone sees."""

from __future__ import annotations

import ast
import json
import subprocess
from pathlib import Path

from helpers import PYTHON, payload

import shmstore

PACKAGE = Path(__file__).resolve().parent.parent / "shmstore"
MOST_LINES = 600

#: The layers, lowest first: a module may import modules of its own layer or of a lower one.
#: Names are modules or packages under shmstore (a package's rank is its modules').
LAYERS = [
    ["errors", "checks", "terminal"],
    ["model"],
    [
        "record",
        "record_checks",
        "feed",
        "procs",
        "atomic",
        "transport.protocol",
        "transport.segment",
        "transport.peer",
        "redis.address",
        "redis.history",
    ],
    ["config", "transport.address", "transport.wire"],
    ["backend", "rules", "listing", "mirror", "retries", "spool", "tmux", "notifications"],
    ["store", "redis.store", "redis.scripts", "redis.proxy", "redis.hosts", "redis.connection"],
    ["agents"],
    ["manager", "clients"],
    ["hook"],
    ["commands"],
    ["__init__", "__main__"],
]


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(parts[:-1]) if parts[-1] == "__init__" and len(parts) > 1 else ".".join(parts)
        found[name] = path
    return found


def rank(name: str) -> int:
    for level, names in enumerate(LAYERS):
        for entry in names:
            if name == entry or name.startswith(entry + "."):
                return level
    raise AssertionError(f"shmstore.{name} is in no layer of tests/test_layout.py")


def _type_checking_only(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that ``name`` imports (at run time)."""
    tree = ast.parse(path.read_text())
    skip = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and _type_checking_only(node)
        for n in ast.walk(node)
    }
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    if name in ("__init__", "__main__"):
        package = []
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - (node.level - 1)]
            target = [*base, *(node.module.split(".") if node.module else [])]
            for alias in node.names:
                for candidate in (".".join([*target, alias.name]), ".".join(target)):
                    if candidate in known:
                        found.add(candidate)
                        break
        elif isinstance(node, ast.ImportFrom | ast.Import):
            for alias in [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]:
                if alias and alias.startswith("shmstore."):
                    found.add(alias[len("shmstore.") :])
    found.discard(name)
    return {module for module in found if module in known}


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(name, path, set(found)) for name, path in found.items()}


def test_no_module_is_over_600_lines() -> None:
    long = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > MOST_LINES}
    assert long == {}


def test_nothing_imports_upward() -> None:
    upward = [
        f"{name} (layer {rank(name)}) imports {target} (layer {rank(target)})"
        for name, targets in graph().items()
        for target in targets
        if rank(target) > rank(name)
    ]
    assert upward == []


def test_the_import_graph_has_no_cycle() -> None:
    edges = graph()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(edges[node]):
            if state.get(target) == 1:
                cycles.append([*path[path.index(target) :], target] if target in path else [node, target])
            elif target not in state:
                visit(target, [*path, target])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert cycles == []


#: The package modules `shmstore hook` loads to report an event to a manager: the light
#: client and the agent's adapter, nothing of the manager, the full client or the CLI.
HOOK_MODULES = {
    "shmstore",
    "shmstore.agents",
    "shmstore.agents.base",
    "shmstore.agents.claude",
    "shmstore.agents.fields",
    "shmstore.checks",
    "shmstore.clients",
    "shmstore.clients.reporter",
    "shmstore.errors",
    "shmstore.hook",
    "shmstore.hook.failures",
    "shmstore.hook.run",
    "shmstore.procs",
    "shmstore.spool",
    "shmstore.terminal",
    "shmstore.transport",
    "shmstore.transport.address",
    "shmstore.transport.protocol",
}


def test_the_hook_loads_only_its_own_modules(server: shmstore.ServerProcess) -> None:
    """As ``python -m shmstore hook`` runs, with the package modules loaded listed at exit
    (``-X importtime`` misses the adapter, which ``importlib`` loads)."""
    code = (
        "import atexit, sys, runpy; "
        "ours = lambda: sorted(m for m in sys.modules if m.split('.')[0] == 'shmstore'); "
        "atexit.register(lambda: sys.stderr.write(repr(ours()))); "
        f"sys.argv = ['shmstore', 'hook', '--address', {str(server.address)!r}, '--timeout', '30']; "
        "runpy.run_module('shmstore', run_name='__main__', alter_sys=True)"
    )
    result = subprocess.run(
        [PYTHON, "-c", code], input=json.dumps(payload("Stop")).encode(), capture_output=True, timeout=30
    )
    assert result.returncode == 0
    assert set(ast.literal_eval(result.stderr.decode())) == HOOK_MODULES
