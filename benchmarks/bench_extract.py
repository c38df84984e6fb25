"""Extraction throughput (tokens/s) on the embedded SmolLM2-135M, with and without early stopping.

    python benchmarks/bench_extract.py [--layers 0 15 29] [--contexts 64] [--batch 16] [--device cpu] [--threads 1]

Tokens/s counts every position of every context (BOS included) pushed through the model.
"early stop" ends the forward pass at the hooked block; "full" runs the whole model
(all blocks, final norm and unembedding), as a naive output_hidden_states extraction would.
"""
from __future__ import annotations

import argparse
import time

import torch

from mcsae.corpora import corpus_tokens
from mcsae.hooks import iter_activations
from mcsae.models import ActivationConfig, load_model


def throughput(model: torch.nn.Module, tokens: torch.Tensor, layer: int, batch: int, stop_early: bool, repeats: int) -> float:
    "Best-of-`repeats` tokens/s of extracting block `layer` activations for `tokens` [N, T]."
    list(iter_activations(model, tokens[:batch], layer, batch, stop_early=stop_early))  # warm up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in iter_activations(model, tokens, layer, batch, stop_early=stop_early): pass
        if tokens.device.type == "cuda": torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return tokens.numel() / best


def main() -> None:
    "Print a table of extraction throughput per layer."
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--layers", type=int, nargs="+", default=[0, 15, 29])
    p.add_argument("--contexts", type=int, default=64)
    p.add_argument("--context-length", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    a = p.parse_args()
    if a.threads: torch.set_num_threads(a.threads)
    t = time.perf_counter()
    model, tok = load_model(a.model, a.device, a.dtype)
    print(f"model {a.model} loaded in {time.perf_counter() - t:.2f} s on {a.device} ({a.dtype}), "
          f"{torch.get_num_threads()} CPU threads")
    cfg = ActivationConfig(model=a.model, context_length=a.context_length, n_tokens=a.contexts * (a.context_length - 1))
    tokens = corpus_tokens(cfg, tok)  # [N, T]
    print(f"{len(tokens)} contexts x {tokens.shape[1]} tokens, model batch {a.batch}")
    print(f"{'layer':>6} {'early stop tok/s':>17} {'full tok/s':>11} {'speedup':>8}")
    for layer in a.layers:
        fast = throughput(model, tokens, layer, a.batch, True, a.repeats)
        full = throughput(model, tokens, layer, a.batch, False, a.repeats)
        print(f"{layer:>6} {fast:>17,.0f} {full:>11,.0f} {fast / full:>7.2f}x")


if __name__ == "__main__":
    main()
