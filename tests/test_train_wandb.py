"""`train(..., wandb=PROJECT)` / `mcsae train --wandb PROJECT`: the lines of metrics.jsonl go to Weights & Biases too
(offline here: WANDB_MODE=offline), and without the wandb package the option fails with one line naming the fix."""
import json
import sys

import pytest
import torch

from mcsae.io import MissingDependency
from mcsae.train import TensorSource, TrainConfig, read_metrics, train
from required import need

BASE = dict(n_features=32, k=4, n_tokens=64 * 12, batch_size=64, warmup_steps=2, log_every=3, checkpoint_every=0)


@pytest.fixture
def source():
    return TensorSource(torch.randn(512, 8, generator=torch.Generator().manual_seed(0)))


def test_wandb_logs_the_metrics_lines(tmp_path, source, monkeypatch):
    wandb = need("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logged: dict[str, list] = {}
    real_init = wandb.init

    def spying_init(**kw):  # the real offline run, with its log calls recorded
        run = real_init(**kw)
        calls = logged.setdefault(kw["name"], [])
        real_log = run.log
        run.log = lambda data, step=None: (calls.append((data, step)), real_log(data, step=step))[1]
        return run

    monkeypatch.setattr(wandb, "init", spying_init)
    cfgs = [TrainConfig(kind="topk", **BASE), TrainConfig(kind="mutual_choice", **BASE)]
    train(cfgs, source, tmp_path, progress=False, wandb="mcsae-test")
    for cfg in cfgs:
        lines = read_metrics(tmp_path / cfg.name)
        assert len(lines) == 4  # steps 3, 6, 9, 12
        assert [data for data, _ in logged[cfg.name]] == lines  # the same dicts, in the same order
        assert [step for _, step in logged[cfg.name]] == [m["step"] for m in lines]
        runs = list((tmp_path / cfg.name / "wandb").glob("offline-run-*"))
        assert len(runs) == 1 and list(runs[0].glob("*.wandb"))  # a real offline run, synced later with `wandb sync`
    paths = train(cfgs, source, tmp_path, progress=False, overwrite=True)  # W&B's folder counts as mcsae's: replaced
    assert all(p.exists() for p in paths) and not (tmp_path / cfgs[0].name / "wandb").exists()


def test_without_wandb_one_line_error(tmp_path, source, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    with pytest.raises(MissingDependency, match=r'pip install "mcsae\[wandb\]"'):
        train(TrainConfig(kind="topk", **BASE), source, tmp_path, progress=False, wandb="p")
    assert not (tmp_path / TrainConfig(kind="topk", **BASE).name / "metrics.jsonl").exists()
    paths = train(TrainConfig(kind="topk", **BASE), source, tmp_path / "plain", progress=False)  # never required
    assert paths and json.loads((tmp_path / "plain" / TrainConfig(kind="topk", **BASE).name / "metrics.jsonl")
                                .read_text().splitlines()[0])["step"] == 3


def test_cli_wandb_option(tmp_path, monkeypatch, capsys):
    from mcsae.cli import build_parser, main
    from mcsae.models import ActivationConfig
    from mcsae.store import build_cache
    from tiny import tiny_model

    assert build_parser().parse_args(["train", "--out", "x", "--wandb", "proj"]).wandb == "proj"
    assert build_parser().parse_args(["train", "--out", "x"]).wandb is None
    model, tok = tiny_model(n_layer=1, d_model=8)
    cache = build_cache(ActivationConfig(model="tiny", corpus="kjv", hook=0, context_length=32, n_tokens=31 * 20),
                        tmp_path / "cache", model, tok, progress=False)
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if wandb were not installed
    with pytest.raises(SystemExit, match="2"):
        main(["train", "--out", str(tmp_path / "runs"), "--cache", str(cache), "--n-features", "16", "--k", "2",
              "--n-tokens", "128", "--batch-size", "64", "--wandb", "proj"])
    err = capsys.readouterr().err
    assert err.startswith("mcsae: error: wandb is needed for ") and err.endswith('pip install "mcsae[wandb]"\n')
    assert err.count("\n") == 1


def test_resume_continues_the_same_wandb_run(tmp_path, source, monkeypatch):
    wandb = need("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    inits: list[dict] = []
    real_init = wandb.init
    monkeypatch.setattr(wandb, "init", lambda **kw: (inits.append(kw), real_init(**kw))[1])
    cfg = TrainConfig(kind="feature_choice", **{**BASE, "checkpoint_every": 3})
    train(cfg, source, tmp_path, progress=False, wandb="mcsae-test", stop_after=6)  # stopped after step 6
    train(cfg, source, tmp_path, progress=False, wandb="mcsae-test", resume=True)
    assert len(inits) == 2 and inits[0]["id"] and inits[1]["id"] == inits[0]["id"]  # one W&B run, continued
    assert inits[1]["resume"] == "allow"
    assert [m["step"] for m in read_metrics(tmp_path / cfg.name)] == [3, 6, 9, 12]
    train(cfg, source, tmp_path, progress=False, wandb="mcsae-test", overwrite=True)  # a new run: a new W&B run
    assert inits[2]["id"] != inits[0]["id"]
