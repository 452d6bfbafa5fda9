"""The import layering of ../shared/STYLE.md, parsed with ``ast`` (imports inside functions count).

Inside ``eggroll_ft`` a module imports only from layers below it (or from its own subpackage); a
new module must be placed in LAYERS. Between the top-level folders, FOLDERS says who may import
whom: the library imports none of the others; ``rewards/``, ``recipes/`` and ``scripts/`` use the
library's public names only; recipes import neither scripts nor each other.
"""
import ast
from pathlib import Path

ROOT = Path(__file__).parents[1]
PKG = ROOT / "eggroll_ft"

LAYERS = {
    "config": 0, "testing": 0, "callbacks": 0, "compare": 0,
    "noise": 1, "shaping": 1, "noise_kernel": 1, "lowrank_cpu": 1,
    "population": 2,
    "models": 3,
    "engine": 4, "es_update": 4, "distributed": 4, "reward_funcs": 4, "bytes_data": 4,
    "integer_es": 4, "tiny_base": 4,
    "replay": 5, "rl": 5, "mingru_recipe": 5,
    "trainer": 6,
    "recipe_utils": 7,
    "__init__": 8,
}

# top-level folder -> the folders its modules may import ("tests" may import anything)
FOLDERS = {
    "eggroll_ft": {"eggroll_ft"},
    "rewards": {"eggroll_ft", "rewards"},
    "recipes": {"eggroll_ft", "rewards"},  # not scripts, not another recipe (its sibling by bare name)
    "scripts": {"eggroll_ft", "rewards", "scripts"},
}
TOP_LEVEL = set(FOLDERS) | {"tests"}


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


def _absolute_imports(path: Path):
    """``(module, imported names)`` of every absolute import in ``path``."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and not node.level and node.module:
            yield node.module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []


def folder_problems(root: Path) -> list[str]:
    """Imports between the top-level folders of ``root`` that FOLDERS does not allow."""
    problems = []
    for folder, allowed in FOLDERS.items():
        for path in sorted((root / folder).rglob("*.py")):
            rel = path.relative_to(root)
            siblings = {p.stem for p in path.parent.glob("*.py")} - {path.stem}
            for module, names in _absolute_imports(path):
                top = _top(module)
                if folder != "eggroll_ft" and top in siblings:  # a script's directory is on sys.path
                    top = folder
                if top not in TOP_LEVEL:
                    continue  # the standard library or a third-party package
                if top not in allowed:
                    problems.append(f"{rel} imports {module} (a {folder}/ module may import only {sorted(allowed)})")
                elif top == "eggroll_ft" and folder != "eggroll_ft":
                    private = [p for p in module.split(".") + names if p.startswith("_") and p != "__init__"]
                    if private:
                        problems.append(f"{rel} imports private {module}: {private} (use the public API)")
    return problems


def test_top_level_folders_import_only_what_they_may():
    problems = folder_problems(ROOT)
    assert not problems, "\n".join(problems)


def test_the_folder_check_catches_a_recipe_importing_a_script_or_a_sibling(tmp_path):
    files = {"scripts/make_model.py": "def build():\n    pass\n",
             "recipes/train.py": "from scripts.make_model import build\nimport eggroll_ft.noise\n",
             "recipes/other.py": "from train import main\nfrom eggroll_ft.noise import _private\n"}
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    assert folder_problems(tmp_path) == [
        "recipes/other.py imports train (a recipes/ module may import only ['eggroll_ft', 'rewards'])",
        "recipes/other.py imports private eggroll_ft.noise: ['_private'] (use the public API)",
        "recipes/train.py imports scripts.make_model (a recipes/ module may import only ['eggroll_ft', 'rewards'])",
    ]
