"""docs/notebooks.py, the stored-output tooling behind `make outputs` and `make test`: normalisation, the staleness
comparison and the skipped cells on hand-made notebooks, nbdev_clean keeping outputs, and one end-to-end store/check
of two tiny notebooks (each execution starts an interpreter that imports torch: ~10 s)."""
import json
import subprocess
from pathlib import Path

from notebook_cells import ROOT, code, load_docs_tool, markdown, notebook

nbtools = load_docs_tool("notebooks")


def test_normalise_removes_addresses_timings_and_local_paths():
    text = (f"<Foo object at 0x7f3a9c2b10d0> id 0x7f3a9c2b10d0\n"
            f"loaded {ROOT}/nbs/x.pt\n"
            "train:  40%|####      | 4/10 [00:01<00:02,  3.10it/s]\rtrain: 100%|##########| 10/10 [00:02<00:00, 4.2it/s]\n"
            "Wall time: 1.23 s\n"
            "Generating train split: 0 examples [00:00, ? examples/s]\rGenerating train split: 2 examples [00:00, 40.74 examples/s]")
    assert nbtools.normalise(text) == ("<Foo object> id 0x…\nloaded <repo>/nbs/x.pt\n"
                                       "train: 100%|##########| 10/10 […<…, … it/s]\nWall time: …\n"
                                       "Generating train split: 2 examples […, … examples/s]")
    assert nbtools.normalise(nbtools.normalise(text)) == nbtools.normalise(text)


def test_stale_cells_named_and_images_compared_loosely():
    def stream(text):
        return {"output_type": "stream", "name": "stdout", "text": [text]}

    def image(data, plain="<Figure size 640x480 with 1 Axes>"):
        return {"output_type": "display_data", "metadata": {}, "data": {"image/png": data, "text/plain": [plain]}}

    stored = notebook([markdown("# T"), code("print(1)", [stream("1\n")]), code("plot()", [image("AAAA")]),
                  code("warn()", [{"output_type": "stream", "name": "stderr", "text": ["old warning\n"]}])])
    fresh = json.loads(json.dumps(stored))
    fresh["cells"][2]["outputs"] = [image("BBBB")]     # other pixels: not stale
    fresh["cells"][3]["outputs"] = []                  # stderr: not compared
    assert nbtools.stale_cells(Path("nbs/t.ipynb"), stored, fresh) == []
    fresh["cells"][1]["outputs"] = [stream("2\n")]
    fresh["cells"][2]["outputs"] = []                  # an image that disappeared is stale
    messages = nbtools.stale_cells(Path("nbs/t.ipynb"), stored, fresh)
    assert len(messages) == 2
    assert messages[0].startswith("nbs/t.ipynb cell 2 (id c") and "-1\n" in messages[0] and "+2\n" in messages[0]
    assert "cell 3" in messages[1] and "(no output)" in messages[1]
    stored["cells"][1]["source"] = fresh["cells"][1]["source"] = "#| volatile\nprint(time())"  # one machine's timing
    assert len(nbtools.stale_cells(Path("nbs/t.ipynb"), stored, fresh)) == 1


def test_skipped_cells_follow_nbdev_test():
    flags = {"notest", "slow", "gpu"}
    assert nbtools.skipped(code("#| slow\nrun()"), flags)
    assert nbtools.skipped(code("#| eval: false\nrun()"), flags)
    assert nbtools.skipped(code("import nbdev; nbdev.nbdev_export()"), flags)
    assert nbtools.skipped(markdown("text"), flags)
    assert not nbtools.skipped(code("#| export\nrun()"), flags)


def test_nbdev_clean_keeps_outputs(tmp_path):
    "With this repo's settings (clear_all = False) nbdev_clean keeps outputs and drops counts and volatile metadata."
    result = {"output_type": "execute_result", "execution_count": 3, "metadata": {},
              "data": {"text/plain": ["<Foo at 0x7f3a9c2b10d0>"]}}
    cell = {**code("Foo()", [result]), "execution_count": 3, "metadata": {"ExecuteTime": {"end": "2026"}, "tags": ["t"]}}
    nb = {**notebook([cell]), "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3"}, "widgets": {},
                                      "language_info": {"version": "3.11.7"}}}
    path = tmp_path / "t.ipynb"
    path.write_text(json.dumps(nb))
    subprocess.run(["nbdev_clean", "--fname", str(path)], cwd=ROOT, check=True, capture_output=True)
    cleaned = json.loads(path.read_text())
    out = cleaned["cells"][0]
    assert out["execution_count"] is None and out["metadata"] == {"tags": ["t"]}
    assert out["outputs"] == [{**result, "execution_count": None, "data": {"text/plain": ["<Foo>"]}}]
    assert "language_info" not in cleaned["metadata"]


def test_store_then_check_end_to_end(tmp_path, capsys):
    """store writes deterministic outputs (flagged cells keep none); check passes on them and names a stale cell;
    a notebook that raises is reported with its cell and left as it was."""
    good = notebook([markdown("# G"), code("import random\nprint(random.random(), object())"), code("#| slow\nprint('slow')"),
                code("1 + 1")])
    bad = notebook([markdown("# B"), code("print('ok')"), code("raise ValueError('broken on purpose')")])
    (tmp_path / "good.ipynb").write_text(json.dumps(good))
    (tmp_path / "bad.ipynb").write_text(bad_text := json.dumps(bad))
    assert nbtools.main(["store", str(tmp_path / "good.ipynb"), str(tmp_path / "bad.ipynb")]) == 1
    out = capsys.readouterr().out
    assert "bad.ipynb cell 3 (id c" in out and "raised ValueError" in out and "broken on purpose" in out
    assert (tmp_path / "bad.ipynb").read_text() == bad_text
    stored = json.loads((tmp_path / "good.ipynb").read_text())
    seeded, flagged, result = (c["outputs"] for c in stored["cells"][1:])
    assert seeded[0]["text"] == ["0.8444218515250481 <object object>\n"]  # random seeded with 0; no address
    assert flagged == [] and result[0]["data"]["text/plain"] == ["2"]
    stale = json.loads(json.dumps(stored))
    stale["cells"][3]["outputs"][0]["data"]["text/plain"] = ["3"]
    (tmp_path / "stale.ipynb").write_text(json.dumps(stale))
    # --flags slow runs the slow cell too, as nbdev_test --flags does; its output is not compared (none is stored)
    assert nbtools.main(["check", "--flags", "slow", str(tmp_path / "good.ipynb"), str(tmp_path / "stale.ipynb")]) == 1
    out = capsys.readouterr()
    assert "good.ipynb: ok" in out.out and "stale.ipynb: STALE OUTPUTS" in out.out
    assert "stale.ipynb cell 4 (id c" in out.out and "-3\n" in out.out and "+2\n" in out.out
    assert "make outputs" in out.err
