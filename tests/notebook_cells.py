"""Helpers shared by the tests of the docs tooling (tests/test_docs.py, tests/test_notebook_outputs.py): loading a
docs/ tool by path, and hand-made notebooks as plain JSON dicts."""
import importlib.util
import itertools
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_ids = itertools.count()


def load_docs_tool(name: str):
    "Load docs/NAME.py by path (`docs` is a folder of tools, not a package)."
    if str(ROOT / "docs") not in sys.path:
        sys.path.insert(0, str(ROOT / "docs"))
    spec = importlib.util.spec_from_file_location(f"mcsae_docs_{name}", ROOT / "docs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def notebook(cells: list[dict]) -> dict:
    "A notebook holding these cells."
    return {"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5}


def markdown(text: str) -> dict:
    "A markdown cell with a fresh id."
    return {"cell_type": "markdown", "id": f"m{next(_ids)}", "metadata": {}, "source": text}


def code(source: str, outputs=()) -> dict:
    "A code cell with a fresh id and the given outputs."
    return {"cell_type": "code", "id": f"c{next(_ids)}", "metadata": {}, "source": source, "outputs": list(outputs),
            "execution_count": None}
