"""The extra presets: `cpu_dead` and `gpu` are well formed, and the gpu preset's sweep runs end to end at smoke size."""
import csv

from mcsae.reproduce import PRESETS, get_preset, run_sweep


def test_gpu_preset_is_paper_like_on_the_embedded_model():
    g = get_preset("gpu")
    assert g.model == "smollm2-135m" and g.corpus == "default" and g.device == "cuda"
    assert g.n_features >= 24576 and g.train_tokens >= 50_000_000 and g.encoder_init == "lstsq"
    runs = g.runs(0, 0.75)
    assert len(runs) == len(g.variants) * (len(g.ks) + len(g.aux))
    assert all(cfg.n_tokens == g.train_tokens and cfg.n_features == g.n_features for *_, cfg in runs)


def test_cpu_dead_preset():
    p = get_preset("cpu_dead")
    assert p.device == "cpu" and p.n_features >= 8192 and p.train_tokens > 1.5 * p.n_tokens  # epochs over the cache
    assert {a for _, a, _, _ in p.runs(0)} == {"none", "aux_k", "aux_zipf"}


def test_gpu_preset_at_smoke_size_runs_end_to_end(tmp_path):
    p = PRESETS["gpu_smoke"]
    run_sweep(p, tmp_path / "work", tmp_path / "results", progress=False)
    rows = list(csv.DictReader(open(tmp_path / "results" / "runs.csv")))
    names = {(r["variant"], r["aux"], r["k"]) for r in rows}
    assert len(names) == len(p.variants) * (len(p.ks) + len(p.aux))
    assert all(0 < float(r["nmse"]) < 2 for r in rows if r["mode"] == "batch")
