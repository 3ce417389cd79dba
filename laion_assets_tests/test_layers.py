"""The layering: `pipeline/` does the work without Dagster and never reaches above itself."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "laion_assets"
ABOVE_THE_PIPELINE = ("laion_assets.defs", "laion_assets.service", "laion_assets.demo", "dagster")
ABOVE_THE_PIPELINE_MODULES = {"laion_assets.cli", "laion_assets.runner", "laion_assets.definitions"}


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def test_pipeline_imports_nothing_from_the_layers_above_it():
    offending = {
        f"{path.relative_to(PACKAGE)}: {module}"
        for path in (PACKAGE / "pipeline").rglob("*.py")
        for module in _imports(path)
        if module.startswith(ABOVE_THE_PIPELINE) or module in ABOVE_THE_PIPELINE_MODULES
    }
    assert not offending


def test_the_names_module_imports_nothing():
    """Every layer uses `names`, so it must not pull any layer in."""
    assert _imports(PACKAGE / "names.py") == set()
