#!/usr/bin/env python3
"""Paired timing of one mcsae training step: eager Trainer.step vs StaticStep (eager) vs StaticStep compiled.

The three run in one process on the same batches, alternating step by step, so that a shared, noisy
machine slows all three alike; reported: compile time (first compiled call), median step ms of each,
and the ratios to the eager step. CPU or CUDA (--device cuda: bf16 autocast as in training, CUDA
graphs through mode="reduce-overhead" unless --compile-mode says otherwise).

  python benchmarks/ab_static.py --batch 4096 --features 6144 --threads 1 --rounds 3
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--features", type=int, default=6144)
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--kinds", nargs="+", default=["topk", "mutual_choice", "feature_choice"])
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds (each: one step of every variant)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--compile-mode", default=None, help="torch.compile mode (default: reduce-overhead on CUDA)")
    ap.add_argument("--json", help="write the rows to this file")
    args = ap.parse_args(argv)

    import torch

    from mcsae.static import StaticStep
    from mcsae.io import atomic_write
    from mcsae.trainer import TrainConfig, Trainer

    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    mode = args.compile_mode or ("reduce-overhead" if cuda else None)
    g = torch.Generator().manual_seed(0)
    xs = [(0.5 + torch.randn(args.batch, args.d, generator=g)).to(args.device) for _ in range(2)]
    rows = []
    for kind in args.kinds:
        cfg = TrainConfig(kind=kind, n_features=args.features, k=args.k, batch_size=args.batch,
                          n_tokens=args.batch * 100)
        ts = [Trainer(cfg, args.d, device=args.device) for _ in range(3)]
        for t in ts:
            t.initialize(xs[0])
        static, compiled = StaticStep(ts[1], args.batch), StaticStep(ts[2], args.batch).compiled(mode=mode)
        steps = {"eager": lambda x: ts[0].step(x), "static": lambda x: static.step(x),
                 "compiled": lambda x: compiled.step(x)}
        t0 = time.perf_counter()
        steps["compiled"](xs[0])
        sync()
        compile_s = time.perf_counter() - t0
        steps["eager"](xs[0])
        steps["static"](xs[0])
        times = {name: [] for name in steps}
        for r in range(args.rounds):
            for name, step in steps.items():
                x = xs[r % 2]
                sync()
                t0 = time.perf_counter()
                step(x)
                sync()
                times[name].append(1e3 * (time.perf_counter() - t0))
        med = {name: statistics.median(v) for name, v in times.items()}
        row = dict(kind=kind, batch=args.batch, features=args.features, threads=torch.get_num_threads(),
                   device=args.device, compile_s=compile_s, **{f"{n}_ms": m for n, m in med.items()},
                   static_vs_eager=med["static"] / med["eager"], compiled_vs_eager=med["compiled"] / med["eager"],
                   times_ms=times)
        rows.append(row)
        print(f"{kind:15s} B={args.batch} F={args.features}: eager {med['eager']:.0f} ms, static {med['static']:.0f} ms "
              f"({row['static_vs_eager']:.2f}x), compiled {med['compiled']:.0f} ms ({row['compiled_vs_eager']:.2f}x); "
              f"compile {compile_s:.0f} s", flush=True)
    if args.json:
        atomic_write(args.json, lambda tmp: Path(tmp).write_text(json.dumps(rows, indent=2)))


if __name__ == "__main__":
    main()
