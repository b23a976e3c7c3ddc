"""The package's floors: each module imports only modules below it, so the data path reads
in the order of this list (README "How it works"), and the remote half only the stdlib."""

import ast
import sys
from pathlib import Path

import sshjobs

PACKAGE = Path(sshjobs.__file__).parent

# Lowest first.  A module may import (at any depth, lazily too) only modules listed before it.
FLOORS = [
    "version", "sshimport", "errors", "args", "requirements", "log", "result", "events",  # the ground floor
    "remote",                                              # the remote half (stdlib only)
    "safe",                                                # the restricted unpickler
    "pickling",                                            # a job's function and arguments, pickled
    "sources",                                             # inventories users have (ssh_config, Ansible)
    "inventory", "connection", "worker", "hosts",          # the data path, in order
    "transfer",                                            # files to and from the hosts (SFTP)
    "provisioning", "scheduler", "trace",                  # the queue; the run's trace
    "journal", "stream", "progress",                       # a map: its journal, engine and bar
    "session",                                             # a running session's client (no SSH)
    "cluster", "api", "executor", "joblib",
    "sessiond",                                            # the session process
    "display", "timeline", "lab", "dockerlab", "cli",      # the faces, the lab beside
    "__init__", "__main__",
]


def _name(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    return rel.parts[0]


def _internal_imports(path: Path) -> set[str]:
    """The sshjobs modules a file imports, outside ``if TYPE_CHECKING:`` blocks."""
    tree = ast.parse(path.read_text("utf-8"))
    found: set[str] = set()
    typing_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            typing_only.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    in_remote = path.parent.name == "remote"
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.level:
            if in_remote and node.level == 1:
                continue  # a sibling in the remote half
            base = (node.module or "").split(".")[0]
            found |= {base} if base else {a.name if a.name in FLOORS else "__init__" for a in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sshjobs"):
            parts = node.module.split(".")
            found |= {parts[1]} if len(parts) > 1 else {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("sshjobs.")}
    return found


def _modules() -> dict[str, set[str]]:
    imports: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        imports.setdefault(_name(path), set()).update(_internal_imports(path) - {_name(path)})
    return imports


def test_every_module_has_a_floor():
    assert set(_modules()) <= set(FLOORS), set(_modules()) - set(FLOORS)


def test_no_module_imports_one_above_it():
    rank = {name: i for i, name in enumerate(FLOORS)}
    wrong = [(mod, dep) for mod, deps in _modules().items() for dep in deps if rank[dep] >= rank[mod]]
    assert wrong == [], f"imports that go up or sideways (module, imported): {wrong}"


def test_the_ground_floor_and_the_remote_half_import_only_below():
    mods = _modules()
    assert mods["errors"] == set()
    assert mods.get("remote", set()) == set()  # stdlib only: it runs on a bare python3


def test_the_remote_half_imports_only_the_standard_library():
    allowed = set(sys.stdlib_module_names)
    for path in (PACKAGE / "remote").glob("*.py") if (PACKAGE / "remote").is_dir() else [PACKAGE / "remote.py"]:
        tree = ast.parse(path.read_text("utf-8"))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            for name in names:
                top = name.split(".")[0]
                assert top in allowed or top == "cloudpickle", f"{path.name} imports {name}"
