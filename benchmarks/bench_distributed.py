#!/usr/bin/env python3
"""Distributed mcsae training: tokens/s and communication per step against the number of processes.

For each variant (mcsae.sae.VARIANTS: topk, feature_choice-zipf, feature_choice-uniform, mutual_choice), auxiliary
loss (--aux, default none), mode and world size W, W processes
(torch.multiprocessing.spawn, gloo on CPU; NCCL with one GPU per process via --device cuda) train one SAE:
mode "data" with mcsae.train.Trainer attached to mcsae.distributed.DataParallel, each rank on its B/W share of
every global batch of B tokens; mode "features" with mcsae.feature_parallel.FeatureParallelTrainer, each rank
holding F/W features and the whole batch. Rank 0 reports the median step time (after warm-up steps), tokens/s = B / step time, and from
DataParallel's counters the payload bytes and rounds (collectives) per step, split into the gradients' all-reduce
and everything else (allocation, decoder partial sums in mode features, statistics, loss normalisers,
metrics); "vs grads" compares that with the gradient payload of data parallelism. A row with W = 1 and
"none" is the plain single-process Trainer, for reference.

Payload is what a rank hands to the collectives; a ring all-reduce puts 2(W-1)/W times that on the wire.

Example:
  OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/bench_distributed.py --worlds 1 2 3 --features 4096 --d 256 \
      --batch 2040 --json benchmarks/results_distributed_cpu_2026-12-04.json
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mcsae.sae import VARIANTS  # variant id -> (SAEConfig fields, display label): the project's names
from mcsae.io import atomic_write

DEFAULT_VARIANTS = list(VARIANTS)
AUX = ("none", "aux_k", "aux_zipf")


def _batches(n: int, B: int, d: int) -> list[torch.Tensor]:
    "n seeded global batches [B, d] with per-dimension means and scales (the same in every process)."
    g = torch.Generator().manual_seed(0)
    mu, scale = torch.randn(d, generator=g), torch.randn(d, generator=g).exp()
    return [mu + scale * torch.randn(B, d, generator=g) for _ in range(n)]


def _worker(rank: int, world: int, port: int, args, variant: str, aux: str, parallel: str, out: str) -> None:
    torch.set_num_threads(args.threads)
    from mcsae.distributed import DataParallel
    from mcsae.feature_parallel import FeatureParallelTrainer
    from mcsae.train import TrainConfig, Trainer

    comm = None
    if parallel != "none":
        backend = "nccl" if args.device == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=300))
        comm = DataParallel()
    device = torch.device("cuda", rank) if args.device == "cuda" else torch.device("cpu")
    fields = VARIANTS[variant][0]  # kind (and capacities)
    # aux: features die after 2 batches, so that the aux loss acts (and communicates) from the third step on
    cfg = TrainConfig(**fields, aux=aux, dead_tokens=2 * args.batch, n_features=args.features, k=args.k,
                      batch_size=args.batch, n_tokens=args.batch * 1000, checkpoint_every=0)
    with tempfile.TemporaryDirectory() as tmp:
        if parallel == "features":  # features split across the ranks, every rank sees the whole batch
            t = FeatureParallelTrainer(cfg, args.d, comm, device=device)
        else:
            t = Trainer(cfg, args.d, tmp, device=device)
        if parallel == "data":
            comm.attach(t)
        batches = _batches(4, args.batch, args.d)
        t.initialize(batches[0])
        n_params = 2 * args.features * args.d + args.features + args.d  # the whole SAE's parameters
        times, sent, rounds = [], [], []
        for i in range(args.warmup + args.steps):
            x = batches[i % len(batches)]
            x = comm.local_batch(x) if parallel == "data" else x
            b0, r0 = (comm.bytes, comm.rounds) if comm else (0, 0)
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            t.step(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= args.warmup:
                times.append(time.perf_counter() - start)
                if comm is not None:
                    sent.append(comm.bytes - b0)
                    rounds.append(comm.rounds - r0)
    if rank == 0:
        step = statistics.median(times)
        grad = 4 * n_params if parallel == "data" else 0  # feature-parallel gradients stay on their rank
        row = {"variant": variant, "kind": cfg.kind, "aux": aux, "world": world, "parallel": parallel, "features": args.features,
               "d": args.d, "batch": args.batch, "k": args.k, "step_s": step, "tokens_per_s": args.batch / step,
               "bytes_per_step": statistics.median(sent) if sent else 0, "grad_bytes": grad,
               "other_bytes": (statistics.median(sent) - grad) if sent else 0, "grad_payload_data_parallel": 4 * n_params,
               "rounds_per_step": statistics.median(rounds) if rounds else 0, "threads_per_rank": args.threads}
        Path(out).write_text(json.dumps(row))
    if comm is not None:
        dist.destroy_process_group()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS), help="variant ids (mcsae.sae.VARIANTS)")
    p.add_argument("--aux", nargs="+", default=["none"], choices=AUX, help="auxiliary losses (each a row)")
    p.add_argument("--worlds", nargs="+", type=int, default=[1, 2])
    p.add_argument("--modes", nargs="+", default=["data", "features"], choices=["data", "features"],
                   help="data: tokens split, replicas; features: features split, whole batch on every rank")
    p.add_argument("--features", type=int, default=4096)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--batch", type=int, default=2048, help="global batch (divisible by every world size)")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (aux losses act from the third step)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args()
    rows = []
    print(f"F={args.features} d={args.d} B={args.batch} k={args.k} device={args.device} threads/rank={args.threads}")
    print(f"{'variant':22} {'aux':8} {'mode':8} {'W':>2} {'step ms':>8} {'tokens/s':>9} {'payload/step':>13} {'grads':>10} "
          f"{'other':>11} {'vs grads':>8} {'rounds':>6}")
    for variant in args.variants:
        for aux in args.aux:
            for world in args.worlds:
                for parallel in (["none", *args.modes] if world == 1 else args.modes):
                    with tempfile.TemporaryDirectory() as tmp:
                        out = os.path.join(tmp, "row.json")
                        mp.spawn(_worker, args=(world, _port(), args, variant, aux, parallel, out), nprocs=world)
                        row = json.loads(Path(out).read_text())
                    rows.append(row)
                    share = row["other_bytes"] / row["grad_payload_data_parallel"] if row["parallel"] != "none" else 0
                    print(f"{variant:22} {aux:8} {row['parallel']:8} {world:>2} {row['step_s'] * 1e3:8.1f} "
                          f"{row['tokens_per_s']:9.0f} {row['bytes_per_step'] / 1e6:11.3f}MB {row['grad_bytes'] / 1e6:8.3f}MB "
                          f"{row['other_bytes'] / 1e3:9.1f}kB {share:8.2%} {row['rounds_per_step']:6.0f}", flush=True)
    if args.json:
        meta = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "cpus": os.cpu_count(),
                "load_average": os.getloadavg(), "command": " ".join(["bench_distributed.py", *map(_portable, sys.argv[1:])])}
        atomic_write(args.json, lambda tmp: Path(tmp).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1)))


def _portable(arg: str) -> str:
    "A command-line argument as the results may record it: paths of this machine relative to the repository, else bare."
    if not os.path.isabs(arg):
        return arg
    root = Path(__file__).resolve().parent.parent
    path = Path(arg).resolve()
    return str(path.relative_to(root)) if path.is_relative_to(root) else path.name


if __name__ == "__main__":
    main()
