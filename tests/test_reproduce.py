"""End to end: `mcsae reproduce --preset smoke` runs every experiment, figure and table notebook with papermill
on the embedded SmolLM2, and every output it promises exists and is non-trivial."""
import csv
import json
import math
import subprocess
import sys


import pytest

from mcsae.reproduce import EXPERIMENTS, FIGURES, get_preset


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    root = tmp_path_factory.mktemp("smoke")
    figures, work = root / "figures", root / "work"
    cmd = [sys.executable, "-c", "from mcsae.cli import main; main()", "reproduce", "--preset", "smoke", "--figures-dir", str(figures),
           "--work-dir", str(work), "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return figures, work


def test_results_cover_the_sweep(smoke):
    figures, _ = smoke
    p = get_preset("smoke")
    with open(figures / "data" / "runs.csv") as f:
        rows = list(csv.DictReader(f))
    expected = {(v, a, k, s) for s in p.seeds for (v, a, k, _) in p.runs(s)}
    assert {(r["variant"], r["aux"], int(r["k"]), int(r["seed"])) for r in rows} == expected
    for r in rows:
        assert 0 < float(r["nmse"]) < 1.5 and math.isfinite(float(r["loss_recovered"]))
    # FC has no dead features by construction
    fc = [r for r in rows if r["variant"].startswith("feature_choice") and r["mode"] == "batch"]
    assert all(float(r["dead_frac_train"]) == 0 for r in fc)
    prov = json.loads((figures / "data" / "provenance.json").read_text())
    assert prov["activations"]["model"] == "smollm2-135m" and prov["preset"]["name"] == "smoke"


def test_every_output_and_the_index(smoke):
    figures, work = smoke
    for name in FIGURES:
        notes = json.loads((figures / f"{name}.notes.json").read_text())
        assert notes["files"] and notes["shows"], name
        for f in notes["files"]:
            assert (figures / f).stat().st_size > 200, f
    for name in EXPERIMENTS + FIGURES:
        assert (work / "notebooks" / f"{name}.ipynb").exists()
    index = (figures / "INDEX.md").read_text()
    assert "smollm2-135m" in index and "not produced" not in index


def test_parameters_are_honoured(smoke, tmp_path):
    """Redraw one figure from the results with papermill parameters: output lands where the parameter says."""
    figures, work = smoke
    from mcsae.reproduce import notebooks_dir, run_notebook
    out = tmp_path / "figs"
    run_notebook("table3_step_time", {"results_dir": str(figures / "data"), "figures_dir": str(out)}, notebooks_dir(),
                 tmp_path / "nb", progress=False)
    assert (out / "table3_step_time.md").exists()
