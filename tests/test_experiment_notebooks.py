"""The experiment and figure notebooks in nbs/experiments/ are papermill-ready: one cell tagged `parameters` that
defines what `mcsae reproduce` injects, a markdown cell first, and nothing exported (they are not library code).
Only parses JSON, so it is fast; `test_reproduce.py` runs them end to end."""
import ast
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NB_DIR = ROOT / "nbs" / "experiments"


def _constant(name: str) -> tuple:
    "A tuple constant of mcsae/reproduce.py, read without importing it (no torch import: the test stays fast)."
    tree = ast.parse((ROOT / "mcsae" / "reproduce.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise LookupError(name)


EXPERIMENTS, FIGURES = _constant("EXPERIMENTS"), _constant("FIGURES")
NOTEBOOKS = sorted(NB_DIR.glob("*.ipynb"))
EXPECTED = {**{n: {"preset", "work_dir", "results_dir"} for n in EXPERIMENTS},
            **{n: {"results_dir", "figures_dir"} for n in FIGURES}}


def _cells(path: Path) -> list[dict]:
    return json.loads(path.read_text())["cells"]


def _source(cell: dict) -> str:
    src = cell["source"]
    return "".join(src) if isinstance(src, list) else src


def test_every_notebook_reproduce_runs_is_there():
    assert {p.stem for p in NOTEBOOKS} >= set(EXPECTED), sorted(set(EXPECTED) - {p.stem for p in NOTEBOOKS})


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_one_parameters_cell_with_the_injected_names(path):
    cells = _cells(path)
    tagged = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"{path.name}: {len(tagged)} cells tagged 'parameters'"
    cell = tagged[0]
    assert cell["cell_type"] == "code"
    tree = ast.parse(_source(cell))
    names = {t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets if isinstance(t, ast.Name)}
    assert all(isinstance(node, ast.Assign) for node in tree.body), f"{path.name}: parameters cell must only assign"
    expected = EXPECTED.get(path.stem, {"results_dir", "figures_dir"})
    assert names == expected, f"{path.name}: parameters {sorted(names)}, expected {sorted(expected)}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_documented_and_not_exported(path):
    cells = _cells(path)
    assert cells and cells[0]["cell_type"] == "markdown" and _source(cells[0]).lstrip().startswith("# "), \
        f"{path.name} must open with a markdown title saying what it shows"
    for c in cells:
        if c["cell_type"] != "code":
            continue
        lines = [line.strip() for line in _source(c).splitlines()]
        assert not any(line.startswith(("#| export", "#|export", "#| default_exp", "#| exporti")) for line in lines), \
            f"{path.name}: experiment notebooks are not library code"
        assert not c.get("outputs"), f"{path.name}: outputs committed (run nbdev_clean)"
