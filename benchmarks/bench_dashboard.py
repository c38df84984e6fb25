"""Time and peak memory of the dashboard's streaming pass (mcsae.dashboard.FeatureCollector) and of writing pages.

    python benchmarks/bench_dashboard.py [--tokens 1000000] [--features 16384] [--k 32] [--pages 200] [--encode-d 0]

Synthetic sparse codes stand in for an SAE's selection: per token about k distinct features drawn from Zipf-like
feature frequencies (a few dense features, a long tail), activations exponentially distributed. The codes arrive in
batches of whole contexts (--context-length, --chunk-tokens) exactly as `collect` feeds them from a cache. Generating
the codes is timed separately and left out of the pass time. With --encode-d D a real TopK SAE (d_in=D) encodes
random activations instead (`select_pairs`), and the encoder's time is reported beside.

Reported: wall-clock and CPU seconds (process time; on a shared machine the CPU time is what a quiet core would
take) and tokens/s of the pass, the size of the collector's state, and the process's peak RSS
(ru_maxrss) before and after the pass, so that the increase is what the pass itself needs. --pages N writes N
feature pages plus the index to a temporary folder and reports the time per page and the bytes written.
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mcsae.dashboard import ContextLayout, DashboardConfig, FeatureCollector, select_pairs
from mcsae.io import atomic_write
from mcsae.dashboard_site import feature_page, index_page
from mcsae.sae import SAE, SAEConfig


def peak_rss_mib() -> float:
    "Peak resident set size of this process so far, MiB."
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def synthetic_codes(n_rows: int, n_features: int, k: int, probs: torch.Tensor, g: torch.Generator):
    "Pairs (token, feature, value) of about k distinct features per token, in token order."
    feature = torch.multinomial(probs, n_rows * k, replacement=True, generator=g)  # [n*k]
    token = torch.arange(n_rows).repeat_interleave(k)
    key = torch.unique(token * n_features + feature)  # sorted, duplicates within a token dropped
    value = torch.empty(key.numel()).exponential_(generator=g)
    return key // n_features, key % n_features, value


def state_bytes(col: FeatureCollector) -> int:
    "Bytes held by the collector's tensors (its whole state between batches)."
    tensors = [col.count, col.total, col.max, col.hist, col.hist_exp, col.l0_hist]
    for t in (col.top, col.samples):
        tensors += [t.keys, t.rows, t.values, t.pool, t.ptr]
    return sum(x.numel() * x.element_size() for x in tensors)


def main() -> None:
    "Run the pass on synthetic codes and print a JSON report."
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=1_000_000)
    p.add_argument("--features", type=int, default=16_384)
    p.add_argument("--k", type=int, default=32, help="mean active features per token")
    p.add_argument("--context-length", type=int, default=128)
    p.add_argument("--chunk-tokens", type=int, default=4096)
    p.add_argument("--n-top", type=int, default=DashboardConfig.n_top)
    p.add_argument("--n-samples", type=int, default=DashboardConfig.n_samples)
    p.add_argument("--pages", type=int, default=200, help="feature pages to write and time (0: none)")
    p.add_argument("--encode-d", type=int, default=0, help="encode random activations with a real TopK SAE of this width")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="also write the report to this JSON file")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)

    T = a.context_length
    n_ctx = -(-a.tokens // (T - 1))
    keep = np.ones((n_ctx, T), dtype=bool)
    keep[:, 0] = False  # BOS positions are not encoded, as in a real cache
    layout = ContextLayout(keep)
    cfg = DashboardConfig(n_top=a.n_top, n_samples=a.n_samples, chunk_tokens=a.chunk_tokens)
    col = FeatureCollector(a.features, layout, cfg)
    probs = 1.0 / torch.arange(1, a.features + 1, dtype=torch.float64) ** 0.8  # Zipf-like feature frequencies
    probs = probs[torch.randperm(a.features, generator=g)]
    sae = SAE(SAEConfig(d_in=a.encode_d, n_features=a.features, k=a.k)) if a.encode_d else None
    rss_before = peak_rss_mib()

    per = max(1, a.chunk_tokens // T)
    t_gen = t_pass = cpu_pass = 0.0
    for c0 in range(0, n_ctx, per):
        r0, r1 = int(layout.starts[c0]), int(layout.starts[min(c0 + per, n_ctx)])
        if r0 >= a.tokens:
            break
        r1 = min(r1, a.tokens)
        t0 = time.perf_counter()
        if sae is None:
            token, feature, value = synthetic_codes(r1 - r0, a.features, a.k, probs, g)
        else:
            token, feature, value = select_pairs(sae, torch.randn(r1 - r0, a.encode_d, generator=g), "batch")
        t1, c1 = time.perf_counter(), time.process_time()
        col.add(r0, r1 - r0, token, feature, value)
        t2, c2 = time.perf_counter(), time.process_time()
        t_gen, t_pass, cpu_pass = t_gen + t1 - t0, t_pass + t2 - t1, cpu_pass + c2 - c1
    rss_after = peak_rss_mib()

    report = {"tokens": col.n_tokens, "features": a.features, "k": a.k, "pairs_per_token": float(col.count.sum()) / col.n_tokens,
              "chunk_tokens": a.chunk_tokens, "n_top": a.n_top, "n_samples": a.n_samples, "threads": a.threads,
              "pass_s": round(t_pass, 2), "pass_tokens_per_s": round(col.n_tokens / t_pass),
              "pass_cpu_s": round(cpu_pass, 2), "pass_tokens_per_cpu_s": round(col.n_tokens / max(cpu_pass, 1e-9)),
              ("encode_s" if sae is not None else "generate_codes_s"): round(t_gen, 2),
              "state_mib": round(state_bytes(col) / 2**20, 1), "layout_mib": round(
                  sum(x.numel() * x.element_size() for x in (layout.position, layout.row, layout.starts)) / 2**20, 1),
              "peak_rss_before_pass_mib": round(rss_before), "peak_rss_after_pass_mib": round(rss_after),
              "torch": torch.__version__}
    if a.pages:
        tokens = np.random.default_rng(0).integers(0, 50_000, size=keep.shape)
        out = Path(tempfile.mkdtemp())
        (out / "features").mkdir()
        fired = (col.count > 0).nonzero().squeeze(1).tolist()
        pages = fired[:a.pages]
        t0, c0 = time.perf_counter(), time.process_time()
        text = str  # token ids as text: no tokenizer in a synthetic run
        for f in pages:
            (out / f"features/f{f:05d}.html").write_text(feature_page(col, f, tokens, text, None, None, None))
        t1, c1 = time.perf_counter(), time.process_time()
        (out / "index.html").write_text(index_page(col, pages, tokens, text, None, ""))
        t2 = time.perf_counter()
        page_bytes = sum(f.stat().st_size for f in (out / "features").iterdir())
        report.update(pages=len(pages), page_ms=round(1000 * (t1 - t0) / max(len(pages), 1), 1),
                      page_cpu_ms=round(1000 * (c1 - c0) / max(len(pages), 1), 1),
                      page_kib=round(page_bytes / max(len(pages), 1) / 1024, 1), index_s=round(t2 - t1, 2),
                      index_mib=round((out / "index.html").stat().st_size / 2**20, 1),
                      peak_rss_end_mib=round(peak_rss_mib()))
        shutil.rmtree(out)
    print(json.dumps(report, indent=1))
    if a.out:
        atomic_write(a.out, lambda tmp: Path(tmp).write_text(json.dumps(report, indent=1) + "\n"))


if __name__ == "__main__":
    main()
