"""The experiment and figure notebooks in nbs/experiments/ are papermill-ready: one cell tagged `parameters` that
defines what `mcsae reproduce` injects, a markdown cell first, and nothing exported (they are not library code).
Those checks only parse JSON; `test_reproduce.py` runs the reproduce notebooks end to end, and the last test here runs
the regime study (run by hand, not by reproduce) at its smoke-size defaults."""
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
            **{n: {"results_dir", "figures_dir"} for n in FIGURES},
            "regime_study": {"results_dir", "figures_dir", "work_dir", "cache_tokens", "eval_fraction", "n_val", "n_features",
                             "large_features", "batch_size", "steps", "dead_tokens", "init_features", "init_batch",
                             "groups_to_run", "redraw_only"}}  # the regime study, run by hand (not by reproduce)
REGIME_FIGURES = {"fig_h1_init", "fig_h1_training", "fig_h2_outliers", "fig_h3_warmup", "fig_h4_fc", "fig_h5_threshold",
                  "fig_dead"}


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


def test_regime_study_runs_at_its_smoke_size_defaults(tmp_path):
    from mcsae.reproduce import run_notebook

    params = {"results_dir": str(tmp_path / "data"), "figures_dir": str(tmp_path / "figures"), "work_dir": str(tmp_path / "work")}
    run_notebook("regime_study", params, NB_DIR, tmp_path / "executed", progress=False)
    assert {p.stem for p in (tmp_path / "figures").glob("*.png")} == REGIME_FIGURES
    groups = {p.stem: json.loads(p.read_text()) for p in (tmp_path / "data").glob("[A-Z]_*.json")}
    assert set(groups) == {"A_init", "B_fixes", "C_aux", "C_ctrl", "D_fc"}
    assert all(0 < r["val"]["nmse"] < 2 and 0 <= r["dead_frac"] <= 1 for g in groups.values() for r in g["runs"])
    init = json.loads((tmp_path / "data" / "init.json").read_text())["rows"]
    assert all(r["next_batch"]["nmse"] < 1.5 for r in init if r["encoder_init"] == "lstsq")  # the scaled start
