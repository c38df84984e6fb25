"""Data- and feature-parallel training on 2 and 3 gloo processes (CPU) against one process given the global batch.

Each world size is one `torch.multiprocessing.spawn` running every case, so the file stays short: allocations
(MC and FC, with ties, with a rank that holds no selected pair; TopK and MC with the features split instead),
training runs of every variant with each auxiliary loss (none, aux_k, aux_zipf) in both modes, compared with one
process step by step, resume across world sizes, streaming from a model, and bad input (uneven batch, mismatched
configs, a rank that stops). More tests launch `mcsae train` itself: under torchrun (--parallel data and features),
with --stream (and --resume), and with a rank that hangs until the process group's timeout."""
import dataclasses
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
from clitools import run_main
from tiny import tiny_model

B, D, N_DATA = 24, 8, 24 * 8  # global batch (splits across 1, 2, 3 processes), width, data rows
VARIANTS = [("topk", "zipf"), ("feature_choice", "zipf"), ("feature_choice", "uniform"), ("mutual_choice", "zipf")]
AUX = ("none", "aux_k", "aux_zipf")
K_AUX = 4  # differs from k = 3: a recorded top-k call with k = K_AUX is the aux loss's selection
RUNS = [(kind, cap, aux) for kind, cap in VARIANTS for aux in AUX]  # every variant with every aux loss, in both modes


def _data() -> torch.Tensor:
    "The same activations in every process (N_DATA, D)."
    g = torch.Generator().manual_seed(0)
    return torch.randn(N_DATA, D, generator=g) * torch.linspace(0.5, 2, D) + 0.3


def _cfg(kind: str, capacities: str, aux: str, **kw) -> TrainConfig:
    "A small config that exercises re-ranking, dead features and the aux losses in a few steps."
    base = dict(n_features=32, k=3, batch_size=B, n_tokens=B * 5, warmup_steps=2, rank_every=2, dead_tokens=2 * B, k_aux=K_AUX,
                log_every=1, checkpoint_every=0)
    if kind == "feature_choice" and aux == "aux_k":  # FC offers every feature a token when k B >= F: with k B < F
        base["k"] = 1  # some features get none, die, and aux_k acts
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
    for kind, cap, aux in RUNS:  # features split across the ranks: every rank sees the whole batch
        res[f"fp/{kind}-{cap}-{aux}"] = _run_features(_cfg(kind, cap, aux), comm)
    data = TensorSource(_data())
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
    res["err/no_comm"] = _error(lambda: train(_cfg("topk", "zipf", "none"), data, out / "bad4", progress=False))
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


def _snapshot(sae: dict, stats: dict) -> dict:
    "What a step leaves in the SAE's and the statistics' buffers (whole-dictionary tensors)."
    return {k: v.detach().clone() for k, v in {**sae, **stats}.items()
            if k in ("thresholds", "demand", "ranks", "density", "tokens_since_fired")}


def _recording(select, masks: list):
    "select, also appending the mask of each allocation it returns to masks."
    def recorded(*args, **kw):
        alloc = select(*args, **kw)
        masks.append(alloc.to_mask())
        return alloc
    return recorded


def _run(cfg: TrainConfig, out: Path, comm: DataParallel | None) -> dict:
    "Train as `train` does, on this rank's share of each batch: the state at the end and after each step, the pairs of each step."
    import mcsae.losses

    t = Trainer(cfg, D, out / cfg.name)
    if comm is not None:
        comm.attach(t)
    masks, aux_masks, metrics, steps = [], [], [], []
    data = TensorSource(_data())
    t.initialize(next(data.batches(B, seed=cfg.seed)))
    t.sae.select = _recording(t.sae.select, masks)  # after initialize: its least-squares start selects on the whole first batch
    topk = mcsae.losses.topk_allocation  # the aux losses' per-token selection
    mcsae.losses.topk_allocation = _recording(topk, aux_masks)
    try:
        stream = data.batches(B, seed=cfg.seed)
        for _ in range(cfg.n_steps):
            x = next(stream)
            metrics.append(t.step(x if comm is None else comm.local_batch(x)))
            steps.append(_snapshot(t.sae.state_dict(), t.stats.state_dict()))
    finally:
        mcsae.losses.topk_allocation = topk
    return {"sae": t.sae.state_dict(), "stats": t.stats.state_dict(), "metrics": metrics, "masks": masks,
            "aux_masks": aux_masks, "steps": steps}


def _run_features(cfg: TrainConfig, comm: DataParallel) -> dict:
    "_run with the features split across the ranks: the gathered state, and this rank's columns of each step's pairs."
    import mcsae.feature_parallel as fp

    t = FeatureParallelTrainer(cfg, D, comm)
    masks, aux_masks, metrics, steps = [], [], [], []
    data = TensorSource(_data())
    t.initialize(next(data.batches(B, seed=cfg.seed)))
    t.sae.select = _recording(t.sae.select, masks)
    topk = fp.topk_feature_parallel  # TopK's selection (k = 3) and the aux losses' (k = K_AUX)

    def aux_topk(comm, z, k, first):
        alloc = topk(comm, z, k, first)
        if k == K_AUX:
            aux_masks.append(alloc.to_mask())
        return alloc

    fp.topk_feature_parallel = aux_topk
    try:
        stream = data.batches(B, seed=cfg.seed)
        for _ in range(cfg.n_steps):
            metrics.append(t.step(next(stream)))
            steps.append(_snapshot(t.full_state(), t.full_stats()))
    finally:
        fp.topk_feature_parallel = topk
    return {"sae": t.full_state(), "stats": t.full_stats(), "metrics": metrics, "masks": masks, "aux_masks": aux_masks,
            "steps": steps}


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


def _assert_matches(single: dict, ranks: list[dict], dim: int) -> None:
    "Each step's pairs (main and aux; the ranks' shares joined along dim), buffers, statistics and metrics, and the end state."
    for what in ("masks", "aux_masks"):
        assert len(ranks[0][what]) == len(single[what]), what  # as many selections, so the aux loss acted at the same steps
        for step, ref in enumerate(single[what]):
            assert torch.equal(torch.cat([r[what][step] for r in ranks], dim), ref), f"{what}, call {step}"
    for step, ref in enumerate(single["steps"]):
        for name, v in ref.items():
            assert _close(ranks[0]["steps"][step][name], v), f"step {step}: {name}"
        assert torch.equal(ranks[0]["steps"][step]["ranks"], ref["ranks"]), f"step {step}"
        assert torch.equal(ranks[0]["steps"][step]["tokens_since_fired"], ref["tokens_since_fired"]), f"step {step}"
    for name, ref in single["sae"].items():
        assert _close(ranks[0]["sae"][name], ref), name
        assert all(torch.equal(r["sae"][name], ranks[0]["sae"][name]) for r in ranks), name  # identical on every rank
    assert torch.equal(ranks[0]["sae"]["ranks"], single["sae"]["ranks"])
    for name, ref in single["stats"].items():
        assert _close(ranks[0]["stats"][name], ref), name
        assert all(torch.equal(r["stats"][name], ranks[0]["stats"][name]) for r in ranks), name
    assert len(ranks[0]["metrics"]) == len(single["metrics"])
    for m, ref in zip(ranks[0]["metrics"], single["metrics"]):
        assert m["step"] == ref["step"] and m["tokens"] == ref["tokens"] and m["l0"] == ref["l0"]
        assert m["lr"] == pytest.approx(ref["lr"], rel=1e-12)
        assert m["nmse"] == pytest.approx(ref["nmse"], rel=1e-4) and m["aux"] == pytest.approx(ref["aux"], rel=1e-4, abs=1e-7)
        assert all(r["metrics"] == ranks[0]["metrics"] for r in ranks)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("kind,cap,aux", RUNS)
@pytest.mark.parametrize("mode", ["data", "features"])
def test_matches_one_process(results, tmp_path, world, kind, cap, aux, mode):
    "Tokens (data) or features split: the same pairs at every step (main and aux), buffers, statistics, metrics and weights."
    res, _ = results
    single = _single(kind, cap, aux, tmp_path)
    key, dim = ("run", 0) if mode == "data" else ("fp", 1)  # the ranks' shares join along tokens or features
    _assert_matches(single, [res[world][r][f"{key}/{kind}-{cap}-{aux}"] for r in range(world)], dim)
    if aux != "none":
        assert any(m["aux"] > 0 for m in single["metrics"]) and single["aux_masks"]  # the aux loss did act


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
        err = res[world][r]["err/no_comm"]  # a group is initialised, but train was not given it: refused, not run alone
        assert f"initialised with {world} processes" in err and "init_data_parallel()" in err and "\n" not in err
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
    # killed (both ranks) right after the step-2 checkpoint; resumed by one plain process: the same SAE
    run_name = Path(printed[0]).parent.name
    cut = [a if a != str(tmp_path / "runs") else str(tmp_path / "cut") for a in features] + ["--checkpoint-every", "2"]
    killed = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
                             "mcsae", *cut], capture_output=True, text=True, timeout=300,
                            env={**env, "MCSAE_FAULT": f"checkpoint:{run_name}:2"})
    assert killed.returncode != 0
    ckpt = tmp_path / "cut" / run_name / "checkpoint.pt"
    assert torch.load(ckpt, weights_only=True)["step"] == 2 and not (ckpt.parent / "sae.safetensors").exists()
    plain = [a for a in cut if a not in ("--parallel", "features")] + ["--resume"]
    resumed = subprocess.run([sys.executable, "-m", "mcsae", *plain], capture_output=True, text=True, timeout=300, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    whole, got = SAE.load(printed[0]).state_dict(), SAE.load(ckpt.parent / "sae.safetensors").state_dict()
    for key, v in whole.items():
        assert _close(got[key], v), key
    env_wandb = {**env, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    logged = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
                             "mcsae", *features, "--overwrite", "--wandb", "p"], capture_output=True, text=True, timeout=300,
                            env=env_wandb)
    assert logged.returncode == 0, logged.stderr[-3000:]
    run_dir = Path(printed[0]).parent
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1  # rank 0 alone logs, to one W&B run
    lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3, 4] and all("dead_frac" in m for m in lines)


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


# ---------------------------------------------------------------------------------------- mcsae train, launched
_ROOT = Path(__file__).resolve().parents[1]
_STREAM_ARGS = ["--hook", "embed", "--corpus", "default", "--context-length", "32", "--model-batch-size", "8",
                "--buffer-size", "256", "--kind", "mutual_choice", "--n-features", "64", "--k", "3", "--batch-size", "48",
                "--n-tokens", str(48 * 6), "--log-every", "1", "--checkpoint-every", "2", "--dead-tokens", "48",
                "--aux", "aux_k", "--k-aux", "4"]
_STREAM_RUN = "mutual_choice-aux_k-k3-F64-s0"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    "The tiny model of the streaming tests, saved where `--model PATH` loads it."
    path = tmp_path_factory.mktemp("model") / "tiny"
    model, tok = tiny_model(n_layer=1, d_model=16)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_cli_stream_and_resume(model_dir, tmp_path, capsys, monkeypatch):
    "`mcsae train --stream` trains from the running model; stopped by Ctrl-C after step 2 and resumed, it ends as the run never stopped."
    args = ["train", "--stream", "--model", model_dir, *_STREAM_ARGS]
    code, out, err = run_main(capsys, *args, "--out", tmp_path / "whole")
    assert code == 0, err[-3000:]
    whole = Path(out.strip().splitlines()[-1])
    assert whole == tmp_path / "whole" / _STREAM_RUN / "sae.safetensors"
    assert SAE.load(whole).provenance == {"model": model_dir, "hook": "embed", "corpus": "default", "context_length": 32,
                                          "d_model": 16, "stream_processes": 1}  # streamed: no cache written
    assert not (tmp_path / "whole" / "activations").exists()
    monkeypatch.setenv("MCSAE_FAULT", f"checkpoint:{_STREAM_RUN}:2=INT")  # Ctrl-C right after the checkpoint of step 2
    code, _, err = run_main(capsys, *args, "--out", tmp_path / "cut")
    assert code == 130 and "--resume" in err, err[-3000:]
    run = tmp_path / "cut" / _STREAM_RUN
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 2 and not (run / "sae.safetensors").exists()
    monkeypatch.delenv("MCSAE_FAULT")
    code, out, err = run_main(capsys, *args, "--out", tmp_path / "cut", "--resume")
    assert code == 0, err[-3000:]
    got, ref = SAE.load(out.strip().splitlines()[-1]).state_dict(), SAE.load(whole).state_dict()
    for name, v in ref.items():
        assert _close(got[name], v), name
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == list(range(1, 7))  # the stream replayed to step 2, not from the start
    assert any(l["aux"] > 0 for l in lines)


def _state(pid: int) -> str:
    "The state letter of a process (T: stopped), from /proc."
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")
def test_hanging_rank_stops_the_others_at_the_timeout(model_dir, tmp_path):
    "A rank that hangs mid-run, its connections open (SIGSTOP), stops the other with a one-line timeout error within --dist-timeout."
    import subprocess
    import time

    timeout_s, port = 8, _free_port()  # short, yet longer than the ranks' start-up skew on a loaded machine
    args = [sys.executable, "-m", "mcsae", "train", "--stream", "--model", model_dir, *_STREAM_ARGS, "--out", tmp_path,
            "--parallel", "data", "--dist-timeout", str(timeout_s)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(_ROOT), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port)}
    env.pop("MCSAE_FAULT", None)
    hangs = subprocess.Popen(args, env={**env, "RANK": "0", "LOCAL_RANK": "0", "MCSAE_FAULT": f"checkpoint:{_STREAM_RUN}:2=STOP"},
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    waits = subprocess.Popen(args, env={**env, "RANK": "1", "LOCAL_RANK": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        deadline = time.monotonic() + 240
        while _state(hangs.pid) != "T":  # rank 0 stops itself after its checkpoint of step 2
            if hangs.poll() is not None or waits.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"rank 0 never hung (exit codes {hangs.poll()}, {waits.poll()}): {waits.stderr.read()[-2000:]}")
            time.sleep(0.05)
        stopped = time.monotonic()
        _, err = waits.communicate(timeout=timeout_s + 60)
        waited = time.monotonic() - stopped
        assert _state(hangs.pid) == "T"  # rank 0 still hangs, its connections open: rank 1 stopped on the timeout
    finally:
        for p in (hangs, waits):
            if p.poll() is None:
                p.kill()  # SIGKILL ends a stopped process too
                p.wait()
    lines = err.strip().splitlines()  # the model's loading bar, then the error
    assert waits.returncode == 2 and [l for l in lines if "mcsae" in l or "Traceback" in l] == lines[-1:], err[-3000:]
    assert lines[-1].startswith("mcsae: error: rank 1/2: ") and f"timeout of {timeout_s} s" in lines[-1], lines[-1]
    assert "--dist-timeout" in lines[-1] and "another rank stopped or hangs" in lines[-1]
    assert waited < timeout_s + 20, waited  # the timeout, plus the exit of a loaded machine; not forever


def test_stream_resume_on_another_number_of_processes_is_refused(tmp_path):
    "A --stream run's shares depend on the number of processes: its checkpoint resumes on that number only, else a clear error."
    model, tok = tiny_model(n_layer=1, d_model=16)
    one = StreamSource(_STREAM, model, tok)
    half = StreamSource(_STREAM, model, tok, comm=SimpleNamespace(rank=0, world=2))  # rank 0's share of 2 processes
    assert one.provenance["stream_processes"] == 1 and half.provenance["stream_processes"] == 2
    train(_stream_cfg(), one, tmp_path, progress=False, stop_after=2)
    with pytest.raises(UserError, match="stream_processes 1 vs 2"):
        train(_stream_cfg(), half, tmp_path, progress=False, resume=True)
    per_epoch = int(one.keep.sum()) // 48
    later = list(zip(range(per_epoch + 2), one.batches(48)))[-1][1]  # resuming in the second epoch skips the first
    assert torch.equal(next(one.batches(48, start=per_epoch + 1)), later)


def test_stream_shares_of_a_single_file_corpus(tmp_path):
    "A one-file corpus is one document: the ranks split its packed contexts instead, disjoint and non-empty."
    (tmp_path / "book.txt").write_text("It was the best of times, it was the worst of times. " * 300)
    model, tok = tiny_model(n_layer=1, d_model=16)
    cfg = dataclasses.replace(_STREAM, corpus=str(tmp_path / "book.txt"), n_tokens=None)
    whole = StreamSource(cfg, model, tok).tokens
    parts = [StreamSource(cfg, model, tok, comm=SimpleNamespace(rank=r, world=2)).tokens for r in range(2)]
    assert all(len(p) for p in parts) and sum(len(p) for p in parts) == len(whole)
    assert sorted(map(tuple, torch.cat(parts).tolist())) == sorted(map(tuple, whole.tolist()))  # the same contexts, split
