"""The import layering of ../shared/STYLE.md: a module imports only from layers below it (or
from its own subpackage). Parsed with ``ast``; a new module must be placed in LAYERS."""
import ast
from pathlib import Path

PKG = Path(__file__).parents[1] / "eggroll_ft"

LAYERS = {
    "config": 0, "testing": 0, "callbacks": 0,
    "noise": 1, "shaping": 1, "noise_kernel": 1,
    "population": 2,
    "models": 3,
    "engine": 4, "es_update": 4, "distributed": 4, "reward_funcs": 4, "bytes_data": 4,
    "integer_es": 4, "recipe_utils": 4,
    "trainer": 5, "rl": 5, "compare": 5,
    "__init__": 6,
}


def _top(module: str) -> str:
    return module.split(".")[0]


def _imports(path: Path):
    """Top-level names of eggroll_ft modules imported by ``path`` (relative or absolute)."""
    rel = path.relative_to(PKG).with_suffix("")
    pkg_parts = list(rel.parts[:-1])
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg_parts[: len(pkg_parts) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
                if not target:  # `from . import x`
                    for alias in node.names:
                        yield alias.name
                    continue
                yield target
            elif node.module and node.module.startswith("eggroll_ft."):
                yield node.module[len("eggroll_ft."):]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("eggroll_ft."):
                    yield alias.name[len("eggroll_ft."):]


def test_every_module_imports_only_lower_layers():
    problems = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG).with_suffix("")
        me = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        if me not in LAYERS:
            problems.append(f"{rel}: not in LAYERS (place the new module in the layering table)")
            continue
        for target in _imports(path):
            top = _top(target)
            if top == me and len(rel.parts) > 1:  # inside its own subpackage (engine/, models/)
                continue
            if top not in LAYERS:
                problems.append(f"{rel}: imports unknown eggroll_ft.{target}")
            elif LAYERS[top] >= LAYERS[me] and me != "__init__":
                problems.append(f"{rel} (layer {LAYERS[me]}) imports {target} (layer {LAYERS[top]})")
    assert not problems, "\n".join(problems)
