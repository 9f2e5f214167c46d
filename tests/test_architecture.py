"""The package's shape: private MLX / mlx-lm names are used only inside semantic_cli/backend/.

Lifting the mlx-lm version pin then means auditing one package. The check is
static (ast), so it sees code that no test runs."""

from __future__ import annotations

import ast
from pathlib import Path

import semantic_cli

PACKAGE = Path(semantic_cli.__file__).parent
MLX_ROOTS = ("mlx", "mlx_lm")
STDLIB_PUBLIC = {("os", "_exit")}  # documented standard-library API despite the underscore


def _private(name: str) -> bool:
    """A single-underscore name (`_idx`), not a dunder (`__init__`)."""
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _modules() -> dict[Path, ast.Module]:
    return {path: ast.parse(path.read_text(), str(path)) for path in sorted(PACKAGE.rglob("*.py"))}


def _own_private_names(modules: dict[Path, ast.Module]) -> set[str]:
    """The `_names` semantic_cli defines itself: functions, classes, assignments,
    import aliases and `self._x` / `cls._x` attributes. Another object's `_x` set
    from outside (`batch._idx = ...`) does not count: that is reaching in."""
    own: set[str] = set()
    for tree in modules.values():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                own.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                own.add(node.id)
            elif isinstance(node, ast.alias) and node.asname:
                own.add(node.asname)
            elif (
                isinstance(node, ast.Attribute)
                and isinstance(node.ctx, ast.Store)
                and isinstance(node.value, ast.Name)
                and node.value.id in ("self", "cls")
            ):
                own.add(node.attr)
    return {n for n in own if _private(n)}


def _is_mlx(module: str | None) -> bool:
    return module is not None and module.split(".")[0] in MLX_ROOTS


def _private_reach(node: ast.AST, own: set[str]) -> bool:
    """`x._name`, or the same reach spelled setattr(x, "_name", ...) / getattr / hasattr / delattr."""
    if isinstance(node, ast.Attribute):
        if isinstance(node.value, ast.Name) and (node.value.id, node.attr) in STDLIB_PUBLIC:
            return False
        return _private(node.attr) and node.attr not in own
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("setattr", "getattr", "hasattr", "delattr"):
        name = node.args[1] if len(node.args) >= 2 else None
        return isinstance(name, ast.Constant) and isinstance(name.value, str) and _private(name.value) and name.value not in own
    return False


def private_mlx_uses(modules: dict[Path, ast.Module]) -> list[str]:
    own = _own_private_names(modules)
    found: list[str] = []
    for path, tree in modules.items():
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] == "backend":
            continue
        for node in ast.walk(tree):
            where = f"{rel}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.ImportFrom) and node.level == 0 and _is_mlx(node.module):
                assert node.module is not None
                if any(_private(part) for part in node.module.split(".")):
                    found.append(f"{where}: imports the private module {node.module}")
                found += [f"{where}: imports the private name {node.module}.{a.name}" for a in node.names if _private(a.name)]
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if _is_mlx(a.name) and any(_private(part) for part in a.name.split(".")):
                        found.append(f"{where}: imports the private module {a.name}")
            elif _private_reach(node, own):
                found.append(f"{where}: uses {ast.unparse(node)}, a private name semantic_cli does not define")
    return found


def test_private_mlx_names_stay_in_backend():
    found = private_mlx_uses(_modules())
    assert found == [], "private MLX/mlx-lm names belong in semantic_cli/backend/ (compat.py), behind a public function:\n" + "\n".join(
        found
    )


def test_the_check_sees_each_kind_of_private_use():
    """Each pattern is caught, and the package's own private names are not."""
    modules = _modules()
    probe = PACKAGE / "kv" / "probe_for_test.py"
    cases = {
        "batch._idx = 0": "batch._idx",
        'setattr(batch, "_idx", 0)  # noqa: B010': "setattr(batch, '_idx', 0)",
        'n = getattr(cache, "_idx")': "getattr(cache, '_idx')",
        "n = cache._idx": "cache._idx",
        "from mlx_lm.utils import _download": "mlx_lm.utils._download",
        "from mlx_lm._private import thing": "mlx_lm._private",
        "import mlx_lm._private": "mlx_lm._private",
    }
    for source, what in cases.items():
        found = private_mlx_uses({**modules, probe: ast.parse(source)})
        assert len(found) == 1 and what in found[0], (source, found)
    own = "class C:\n    def __init__(self):\n        self._mine = 1\n\n    def f(self):\n        return self._mine, other._mine\n"
    own += "\n\nos._exit(0)\n"
    assert private_mlx_uses({**modules, probe: ast.parse(own)}) == []
    assert private_mlx_uses({**modules, PACKAGE / "backend" / "probe_for_test.py": ast.parse("batch._idx = 0")}) == []
