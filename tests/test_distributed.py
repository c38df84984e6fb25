"""Data-parallel training on 2 and 3 gloo processes (CPU) against one process given the global batch.

Each world size is one `torch.multiprocessing.spawn` running every case, so the file stays short: allocations
(MC and FC, with ties, with a rank that holds no selected pair; TopK and MC with the features split instead),
training runs of every variant with and without auxiliary losses, resume across world sizes, streaming from a
model, and bad input (uneven batch, mismatched configs, a rank that stops). One more test launches
`torchrun -m mcsae train --parallel data`."""
import json
import os
import shutil
import socket
import sys
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mcsae.io import UserError
from mcsae.models import ActivationConfig
from mcsae.allocation import feature_choice_mask, mutual_choice_mask, topk_mask, zipf_capacities
from mcsae.distributed import (DataParallel, DistributedError, StreamSource, feature_choice_global, feature_share,
                               mutual_choice_feature_parallel, mutual_choice_global, topk_feature_parallel)
from mcsae.feature_parallel import FeatureParallelTrainer, train_feature_parallel
from mcsae.sae import SAE
from mcsae.train import TensorSource, TrainConfig, Trainer, train
from tiny import tiny_model

B, D, N_DATA = 24, 8, 24 * 8  # global batch (splits across 1, 2, 3 processes), width, data rows
VARIANTS = [("topk", "zipf"), ("feature_choice", "zipf"), ("feature_choice", "uniform"), ("mutual_choice", "zipf")]
RUNS = [(kind, cap, aux) for kind, cap in VARIANTS for aux in ("none", "aux_zipf")] + [("mutual_choice", "zipf", "aux_k")]


def _data() -> torch.Tensor:
    "The same activations in every process (N_DATA, D)."
    g = torch.Generator().manual_seed(0)
    return torch.randn(N_DATA, D, generator=g) * torch.linspace(0.5, 2, D) + 0.3


def _cfg(kind: str, capacities: str, aux: str, **kw) -> TrainConfig:
    "A small config that exercises re-ranking, dead features and the aux losses in a few steps."
    base = dict(n_features=32, k=3, batch_size=B, n_tokens=B * 5, warmup_steps=2, rank_every=2, dead_tokens=2 * B, k_aux=4,
                log_every=1, checkpoint_every=0)
    return TrainConfig(kind=kind, capacities=capacities, aux=aux, **{**base, **kw})


_STREAM = ActivationConfig(corpus="default", hook="embed", context_length=32, n_tokens=3000, model_batch_size=8, batch_size=64,
                           buffer_size=256)


def _stream_cfg() -> TrainConfig:
    return _cfg("feature_choice", "zipf", "none", batch_size=48, n_tokens=48 * 4)


def _affinities(seed: int, n: int, F: int, ties: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, F, generator=g).relu()
    return (z * 2).round() / 2 if ties else z  # ties: few distinct values


def _allocation_cases(world: int):
    "(name, global affinities, kind, budget or capacities) for the allocation checks."
    cases = []
    for seed in range(6):
        for ties in (False, True):
            n = 12 * world if seed % 2 else 48
            z = _affinities(seed, n, 19, ties)
            cases.append((f"mc-{seed}-{ties}", z, "mc", (seed % 4 + 1) * n))
            caps = zipf_capacities(19, 3 * n, max_per_feature=n, ranks=torch.randperm(19, generator=torch.Generator().manual_seed(seed)) + 1)
            cases.append((f"fc-{seed}-{ties}", z, "fc", caps))
    z = _affinities(7, 12 * world, 19, False)
    z[12:] *= 0.01  # every rank after the first holds only small affinities: no selected pair under MC
    cases.append(("mc-empty-slices", z, "mc", 2 * 12 * world))
    cases.append(("mc-all-zero", torch.zeros(6 * world, 19), "mc", 10))
    cases.append(("mc-few-positive", _affinities(8, 6 * world, 19, True) * (torch.rand(6 * world, 19, generator=torch.Generator().manual_seed(1)) < 0.05), "mc", 60))
    return cases


def _feature_cases():
    "(name, affinities, kind, k or budget) for the feature-split allocation checks."
    cases = []
    for seed in range(4):
        z = _affinities(seed, 16, 19, ties=bool(seed % 2))
        cases += [(f"topk-{seed}", z, "topk", 3), (f"mc-{seed}", z, "mc", 40)]
    return cases


def _worker(rank: int, world: int, port: int, out: str) -> None:
    "Every case on one rank; results in out/rank{rank}.pt."
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                           timeout=timedelta(seconds=20))
    comm, out, res = DataParallel(), Path(out), {}
    for name, z, kind, arg in _allocation_cases(world):  # allocation: this rank's share of the global selection
        n = z.shape[0] // world
        share = z[rank * n:(rank + 1) * n]
        alloc = mutual_choice_global(comm, share, arg) if kind == "mc" else feature_choice_global(comm, share, arg)
        res[f"alloc/{name}"] = alloc.to_mask()
    for name, z, kind, arg in _feature_cases():  # features split across the ranks instead of tokens
        first, stop = feature_share(z.shape[1], world, rank)
        cols = z[:, first:stop]
        alloc = (topk_feature_parallel(comm, cols, arg, first) if kind == "topk"
                 else mutual_choice_feature_parallel(comm, cols, arg, first, z.shape[1]))
        res[f"features/{name}"] = alloc.to_mask()
    for kind, cap, aux in RUNS:  # training runs: every rank's own state, and the pairs it selected at each step
        res[f"run/{kind}-{cap}-{aux}"] = _run(_cfg(kind, cap, aux), out / "runs", comm)
    data = TensorSource(_data())
    for kind, cap in VARIANTS:  # features split across the ranks: every rank sees the whole batch
        t = FeatureParallelTrainer(_cfg(kind, cap, "none"), D, comm)
        data = TensorSource(_data())
        t.initialize(next(data.batches(B)))
        stream = data.batches(B)
        for _ in range(t.cfg.n_steps):
            t.step(next(stream))
        res[f"fp/{kind}-{cap}"] = t.full_state()
    fp_cfg = _cfg("mutual_choice", "zipf", "none")
    if world == 2:
        train_feature_parallel(fp_cfg, TensorSource(_data()), out / "fp_half", comm, stop_after=3)
    if world == 3:
        if rank == 0:
            shutil.copytree(Path(os.environ["MCSAE_TEST_HALF"]).parent / "fp_half", out / "fp_resumed")
        comm.barrier()
        train_feature_parallel(fp_cfg, TensorSource(_data()), out / "fp_resumed", comm, resume=True)
    if world == 2:  # a run stopped after 3 steps, resumed on 3 processes and on 1 by the parent
        train(_cfg("feature_choice", "zipf", "aux_zipf"), data, out / "half", progress=False, comm=comm, stop_after=3)
    if world == 3:  # resume that run here, from a copy of what the 2 processes wrote
        if rank == 0:
            shutil.copytree(os.environ["MCSAE_TEST_HALF"], out / "resumed")
        comm.barrier()
        train(_cfg("feature_choice", "zipf", "aux_zipf"), data, out / "resumed", progress=False, comm=comm, resume=True)
    if world == 2:  # streaming from a running model: each rank its own share of the corpus
        model, tok = tiny_model(n_layer=1, d_model=16)
        train(_stream_cfg(), StreamSource(_STREAM, model, tok, comm=comm), out / "stream", progress=False, comm=comm)
    # bad input: each is a one-line UserError on every rank
    res["err/uneven"] = _error(lambda: train(_cfg("topk", "zipf", "none", n_tokens=(B + 1) * 2, batch_size=B + 1),
                                             data, out / "bad", progress=False, comm=comm))
    mine = _cfg("mutual_choice", "zipf", "none", k=3 + (rank == world - 1))
    res["err/mismatch"] = _error(lambda: train(mine, data, out / "bad2", progress=False, comm=comm))
    res["err/drop"] = _error(lambda: train(_cfg("topk", "zipf", "none", outlier_norm=2.0, outlier_action="drop"),
                                           data, out / "bad3", progress=False, comm=comm))
    # the last rank stops in the middle of training: the others must raise DistributedError, not hang
    trainer = Trainer(_cfg("mutual_choice", "zipf", "none"), D, out / "fail")
    comm.attach(trainer)
    x = comm.local_batch(_data()[:B])
    try:
        for step in range(4):
            if rank == world - 1 and step == 2:
                raise SystemExit  # this rank stops before step 2
            trainer.step(x)
        res["err/peer"] = "no error"
    except SystemExit:
        res["err/peer"] = "stopped"
    except DistributedError as e:
        res["err/peer"] = str(e)
    torch.save(res, out / f"rank{rank}.pt")
    if rank == world - 1:
        os._exit(0)  # leave without saying goodbye, as a crashed rank would
    dist.destroy_process_group()


def _run(cfg: TrainConfig, out: Path, comm: DataParallel | None) -> dict:
    "Train as `train` does, on this rank's share of each batch; what the trainer holds at the end, and the pairs of each step."
    t = Trainer(cfg, D, out / cfg.name)
    if comm is not None:
        comm.attach(t)
    masks, select = [], t.sae.select

    def recorded(aff, mode="batch"):
        alloc = select(aff, mode)
        masks.append(alloc.to_mask())
        return alloc

    data = TensorSource(_data())
    t.initialize(next(data.batches(B, seed=cfg.seed)))
    t.sae.select = recorded  # after initialize: its least-squares start selects on the whole first batch, not a share
    stream, metrics = data.batches(B, seed=cfg.seed), []
    for _ in range(cfg.n_steps):
        x = next(stream)
        metrics.append(t.step(x if comm is None else comm.local_batch(x)))
    return {"sae": t.sae.state_dict(), "stats": t.stats.state_dict(), "metrics": metrics, "masks": masks}


def _error(fn) -> str:
    try:
        fn()
    except UserError as e:
        return str(e)
    return "no error"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    "Run every case on 2 and then 3 processes: {world: [rank results]}, and the folders they wrote."
    out, res = {}, {}
    for world in (2, 3):
        out[world] = tmp_path_factory.mktemp(f"world{world}")
        os.environ["MCSAE_TEST_HALF"] = str(out[2] / "half")
        mp.spawn(_worker, args=(world, _free_port(), str(out[world])), nprocs=world, join=True)
        res[world] = [torch.load(out[world] / f"rank{r}.pt", weights_only=False) for r in range(world)]
    return res, out


@pytest.mark.parametrize("world", [2, 3])
def test_allocation_matches_one_process(results, world):
    "Each rank's share of the MC / FC allocation is the matching rows of the single-process reference mask."
    res, _ = results
    for name, z, kind, arg in _allocation_cases(world):
        ref = mutual_choice_mask(z, arg) if kind == "mc" else feature_choice_mask(z, arg)
        got = torch.cat([res[world][r][f"alloc/{name}"] for r in range(world)])
        assert torch.equal(got, ref), name
    z = _allocation_cases(world)[-3][1]
    assert not mutual_choice_mask(z, 24 * world)[12:].any()  # the case where later ranks select nothing is one
    assert mutual_choice_mask(z, 24 * world).any()


_SINGLE: dict = {}


def _single(kind: str, cap: str, aux: str, tmp_path: Path) -> dict:
    "The single-process run of a variant (computed once for both world sizes)."
    if (kind, cap, aux) not in _SINGLE:
        _SINGLE[kind, cap, aux] = _run(_cfg(kind, cap, aux), tmp_path, None)
    return _SINGLE[kind, cap, aux]


@pytest.mark.parametrize("world", [2, 3])
def test_feature_split_allocation_matches_one_process(results, world):
    "Features split across ranks: each rank's columns of the TopK / MC allocation are those of the single-process mask."
    res, _ = results
    for name, z, kind, arg in _feature_cases():
        ref = topk_mask(z, arg) if kind == "topk" else mutual_choice_mask(z, arg)
        got = torch.cat([res[world][r][f"features/{name}"] for r in range(world)], 1)
        assert torch.equal(got, ref), name


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a.double(), b.double(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("kind,cap,aux", RUNS)
def test_training_matches_one_process(results, tmp_path, world, kind, cap, aux):
    "Same pairs at every step, weights, thresholds, ranks, demand and feature statistics as one process; identical across ranks."
    res, _ = results
    key = f"run/{kind}-{cap}-{aux}"
    ranks = [res[world][r][key] for r in range(world)]
    single = _single(kind, cap, aux, tmp_path)
    for step, ref in enumerate(single["masks"]):
        assert torch.equal(torch.cat([r["masks"][step] for r in ranks]), ref), f"step {step}"
    for name, ref in single["sae"].items():
        assert _close(ranks[0]["sae"][name], ref), name
        assert all(torch.equal(r["sae"][name], ranks[0]["sae"][name]) for r in ranks), name  # identical on every rank
    assert torch.equal(ranks[0]["sae"]["ranks"], single["sae"]["ranks"])
    for name, ref in single["stats"].items():
        assert _close(ranks[0]["stats"][name], ref), name
        assert all(torch.equal(r["stats"][name], ranks[0]["stats"][name]) for r in ranks), name
    for m, ref in zip(ranks[0]["metrics"], single["metrics"]):
        assert m["step"] == ref["step"] and m["tokens"] == ref["tokens"] and m["l0"] == ref["l0"]
        assert m["nmse"] == pytest.approx(ref["nmse"], rel=1e-4) and m["aux"] == pytest.approx(ref["aux"], rel=1e-4, abs=1e-7)
        assert all(r["metrics"] == ranks[0]["metrics"] for r in ranks)
    if aux != "none":
        assert any(m["aux"] > 0 for m in single["metrics"])  # the aux loss did act


def test_resume_across_world_sizes(results, tmp_path):
    "A run stopped after 3 steps by 2 processes, resumed on 3 and on 1, ends where one uninterrupted process ends."
    _, out = results
    cfg = _cfg("feature_choice", "zipf", "aux_zipf")
    data = TensorSource(_data())
    half = out[2] / "half" / cfg.name
    assert torch.load(half / "checkpoint.pt", weights_only=True)["step"] == 3
    assert not (half / "sae.safetensors").exists()
    shutil.copytree(out[2] / "half", tmp_path / "one")
    on_one = train(cfg, data, tmp_path / "one", progress=False, resume=True)[0]
    whole = SAE.load(train(cfg, data, tmp_path / "whole", progress=False)[0]).state_dict()
    on_three = out[3] / "resumed" / cfg.name
    for path in (on_one, on_three / "sae.safetensors"):
        got = SAE.load(path).state_dict()
        for name, v in whole.items():
            assert _close(got[name], v), (path, name)
    lines = [json.loads(l) for l in (on_three / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == list(range(1, 6))  # rank 0 alone logs: each step once


@pytest.mark.parametrize("world", [2, 3])
def test_bad_input(results, world):
    "Uneven batch, mismatched configs and outlier dropping: one-line UserErrors on every rank; a stopped rank: DistributedError."
    res, _ = results
    for r in range(world):
        err = res[world][r]["err/uneven"]
        assert "does not split across" in err and "\n" not in err
        err = res[world][r]["err/mismatch"]
        assert "differs from rank" in err and "['k'" in err and "\n" not in err
        err = res[world][r]["err/drop"]
        assert "unequal shares" in err and "outlier_action='clip'" in err and "\n" not in err
    assert res[world][world - 1]["err/peer"] == "stopped"
    for r in range(world - 1):
        err = res[world][r]["err/peer"]
        assert err.startswith(f"rank {r}/{world}:") and "another rank stopped" in err and "\n" not in err


def test_cli_torchrun(tmp_path):
    "`torchrun --nproc-per-node 2 -m mcsae train --parallel data` trains from a cache; rank 0 alone writes and prints."
    import subprocess

    from mcsae.store import build_cache

    model, tok = tiny_model(n_layer=1, d_model=16)
    cfg = ActivationConfig(corpus="default", hook="embed", context_length=32, n_tokens=4000, model_batch_size=16)
    cache = build_cache(cfg, tmp_path / "acts", model, tok, shard_tokens=2000, eval_fraction=0.2, progress=False)
    common = ["train", "--cache", str(cache), "--out", str(tmp_path / "runs"), "--kind", "mutual_choice", "--n-features", "64",
              "--k", "4", "--batch-size", "64", "--n-tokens", "256", "--log-every", "1", "--parallel", "data"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "mcsae", *common], capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    printed = [l for l in run.stdout.splitlines() if l.endswith("sae.safetensors")]
    assert len(printed) == 1 and Path(printed[0]).exists()  # one rank prints
    lines = (Path(printed[0]).parent / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["step"] for l in lines] == [1, 2, 3, 4]  # one rank logs
    features = [a if a != "data" else "features" for a in common]  # the dictionary split across the 2 ranks
    features[features.index("mutual_choice")] = "feature_choice"
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "mcsae", *features], capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    printed = [l for l in run.stdout.splitlines() if l.endswith("sae.safetensors")]
    assert len(printed) == 1 and SAE.load(printed[0]).cfg.kind == "feature_choice"
    again = subprocess.run([sys.executable, "-m", "mcsae", *features[:-2], "--kind", "topk,mutual_choice",
                            "--parallel", "features"], capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 2 and again.stderr.startswith("mcsae: error: --parallel features trains one SAE")
    assert len(again.stderr.strip().splitlines()) == 1
    logged = subprocess.run([sys.executable, "-m", "mcsae", *features, "--wandb", "p"], capture_output=True, text=True,
                            timeout=300, env=env)
    assert logged.returncode == 2 and logged.stderr.startswith("mcsae: error: --wandb does not log feature-parallel")


def test_feature_parallel_refuses_aux_losses():
    "Auxiliary losses are not supported feature-parallel: a one-line UserError naming the fix."
    for aux in ("aux_k", "aux_zipf"):
        with pytest.raises(UserError, match="supports --aux none only") as e:
            FeatureParallelTrainer(_cfg("mutual_choice", "zipf", aux), D, comm=None)
        assert "\n" not in str(e.value) and "--parallel data" in str(e.value)


class _Joined:
    "One process's view of what 2 streaming ranks feed: their batches side by side, in rank order."

    sharded = False
    d_model = 16

    def __init__(self, model, tok):
        self.parts = [StreamSource(_STREAM, model, tok, comm=SimpleNamespace(rank=r, world=2)) for r in range(2)]

    def batches(self, batch_size: int, seed: int = 0, start: int = 0):
        streams = [p.batches(batch_size // 2, seed, start) for p in self.parts]
        while True:
            yield torch.cat([next(s) for s in streams])


def test_streaming_matches_one_process(results, tmp_path):
    "2 ranks streaming disjoint shares of the corpus train the SAE one process trains on their batches side by side."
    _, out = results
    model, tok = tiny_model(n_layer=1, d_model=16)
    joined = _Joined(model, tok)
    a, b = (set(map(tuple, p.tokens.tolist())) for p in joined.parts)
    assert a and b and not a & b  # disjoint contexts
    ref = SAE.load(train(_stream_cfg(), joined, tmp_path, progress=False)[0]).state_dict()
    got = SAE.load(out[2] / "stream" / _stream_cfg().name / "sae.safetensors").state_dict()
    for name, v in ref.items():
        assert _close(got[name], v), name


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("kind,cap", VARIANTS)
def test_feature_parallel_matches_one_process(results, tmp_path, world, kind, cap):
    "Features split across ranks: the gathered SAE (weights, thresholds, demand, ranks) is the single-process one."
    res, _ = results
    got, ref = res[world][0][f"fp/{kind}-{cap}"], _single(kind, cap, "none", tmp_path)["sae"]
    for name, v in ref.items():
        assert _close(got[name], v), name
    assert torch.equal(got["ranks"], ref["ranks"])


def test_feature_parallel_resume(results, tmp_path):
    "A feature-parallel run stopped by 2 processes, resumed feature-parallel on 3 and by one plain process, ends as one process does."
    _, out = results
    cfg = _cfg("mutual_choice", "zipf", "none")
    data = TensorSource(_data())
    half = out[2] / "fp_half" / cfg.name / "checkpoint.pt"
    assert torch.load(half, weights_only=True)["step"] == 3
    shutil.copytree(out[2] / "fp_half", tmp_path / "one")
    on_one = train(cfg, data, tmp_path / "one", progress=False, resume=True)[0]  # the plain Trainer reads the gathered file
    whole = SAE.load(train(cfg, data, tmp_path / "whole", progress=False)[0]).state_dict()
    for path in (on_one, out[3] / "fp_resumed" / cfg.name / "sae.safetensors"):
        got = SAE.load(path).state_dict()
        for name, v in whole.items():
            assert _close(got[name], v), (path, name)
