"""Benchmark the allocation schemes: reference masks vs fast exact allocations (median ms, CPU or CUDA).

    python benchmarks/bench_allocation.py [--device cpu|cuda] [--repeats 7] [--features 6144 24576]

Affinities are realistic: z = relu(x @ W.T + b), x ~ N(0, 1) [B, 768], W random unit rows, b slightly negative
(about half of z is zero). B = 4096 tokens, k = 32, budget K = k·B.
"""
import argparse
import time

import torch

from mcsae.allocation import (
    feature_choice_allocation, feature_choice_mask, mutual_choice_allocation, mutual_choice_mask,
    topk_allocation, topk_mask, uniform_capacities, zipf_capacities,
)


CLOCK = time.perf_counter


def median_ms(fn, repeats: int, device: str) -> float:
    "Median time of fn() in milliseconds (after one warm-up call)."
    fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = CLOCK()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(CLOCK() - t0)
    return 1e3 * sorted(times)[len(times) // 2]


def affinities(B: int, F: int, d: int, device: str, seed: int = 0) -> torch.Tensor:
    "Realistic SAE affinities relu(x W^T + b) [B, F]."
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(F, d, generator=g)
    W /= W.norm(dim=1, keepdim=True)
    x = torch.randn(B, d, generator=g)
    return torch.relu(x @ W.T - 0.3).to(device)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--features", type=int, nargs="+", default=[6144, 24576])
    p.add_argument("--no-reference", action="store_true", help="skip the slow reference masks")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--cpu-time", action="store_true", help="time with process_time (robust on a shared CPU; use with --threads 1)")
    a = p.parse_args()
    global CLOCK
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.cpu_time:
        CLOCK = time.process_time
    B, k, dev = a.tokens, a.k, a.device
    print(f"device={dev} threads={torch.get_num_threads()} clock={CLOCK.__name__} B={B} k={k} K={k * B} repeats={a.repeats} (median ms)")
    with torch.no_grad():
        for F in a.features:
            z = affinities(B, F, 768, dev)
            cz = zipf_capacities(F, k * B, max_per_feature=B)
            cu = uniform_capacities(F, k * B)
            print(f"\nF={F}  zeros={float((z == 0).float().mean()):.2f}  zipf capacities: max {int(cz.max())}, min {int(cz.min())}")
            base = median_ms(lambda: torch.topk(z, k, dim=1), a.repeats, dev)
            rows = [("torch.topk per row (context)", None, base),
                    ("torch.topk global flatten (context)", None, median_ms(lambda: torch.topk(z.reshape(-1), k * B), a.repeats, dev))]
            schemes = [
                ("topk", lambda: topk_mask(z, k), lambda: topk_allocation(z, k)),
                ("mutual_choice / batchtopk", lambda: mutual_choice_mask(z, k * B), lambda: mutual_choice_allocation(z, k * B)),
                ("feature_choice zipf s=1", lambda: feature_choice_mask(z, cz), lambda: feature_choice_allocation(z, cz)),
                ("feature_choice uniform", lambda: feature_choice_mask(z, cu), lambda: feature_choice_allocation(z, cu)),
            ]
            for name, ref, fast in schemes:
                ref_ms = None if a.no_reference else median_ms(ref, max(1, a.repeats // 3), dev)
                rows.append((name, ref_ms, median_ms(fast, a.repeats, dev)))
            print(f"{'scheme':38s} {'reference':>10s} {'fast':>9s} {'ref/fast':>9s} {'fast/topk':>10s}")
            for name, ref_ms, fast_ms in rows:
                ref_s = "" if ref_ms is None else f"{ref_ms:10.1f}"
                speed = "" if ref_ms is None else f"{ref_ms / fast_ms:8.1f}x"
                print(f"{name:38s} {ref_s:>10s} {fast_ms:9.1f} {speed:>9s} {fast_ms / base:9.2f}x")


if __name__ == "__main__":
    main()
