#!/usr/bin/env python3
"""Where one mcsae training step spends its time: torch.profiler over Trainer.step.

  python benchmarks/profile_step.py --kind topk --features 6144 --batch 4096 --device cpu
  python benchmarks/profile_step.py --kind mutual_choice --device cuda --rows 30

Prints the median step time and the operators sorted by self time (CPU or CUDA).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mcsae.train import TrainConfig, Trainer  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kind", default="topk", help="topk | feature_choice | mutual_choice")
    ap.add_argument("--features", type=int, default=6144)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=5, help="profiled steps (after 3 warm-up steps)")
    ap.add_argument("--rows", type=int, default=25)
    args = ap.parse_args(argv)

    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(args.batch, args.d, generator=g).to(args.device) for _ in range(4)]
    cfg = TrainConfig(kind=args.kind, n_features=args.features, k=args.k, batch_size=args.batch,
                      n_tokens=args.batch * 1000)
    trainer = Trainer(cfg, args.d, tempfile.mkdtemp(prefix="mcsae-profile-"), device=args.device)
    trainer.initialize(xs[0])
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    times = []
    for i in range(3 + args.steps):
        sync()
        t0 = time.perf_counter()
        trainer.step(xs[i % 4])
        sync()
        times.append(time.perf_counter() - t0)
    print(f"{args.kind} F={args.features} B={args.batch} on {args.device}: "
          f"median step {1e3 * statistics.median(times[3:]):.2f} ms (threads {torch.get_num_threads()})")
    cuda = args.device.startswith("cuda")
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        for i in range(args.steps):
            trainer.step(xs[i % 4])
        sync()
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=args.rows))


if __name__ == "__main__":
    main()
