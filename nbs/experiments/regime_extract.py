"""Incremental extraction for the regime study on a loaded machine: the packed, shuffled contexts that `mcsae cache`
would use (runs/regime/tokens.npy), run through SmolLM2-135M up to block 8, saved 16 contexts per file, so that every
minute of extraction is kept. Order: validation contexts, test contexts, then training contexts. Resumable."""
from pathlib import Path

import numpy as np
import torch

from mcsae.hooks import iter_activations
from mcsae.models import load_model

torch.set_num_threads(1)
root = Path("runs/regime/acts")
tokens = torch.from_numpy(np.load("runs/regime/tokens.npy").astype(np.int64))  # [N, 128]
keep = torch.from_numpy(np.load("runs/regime/keep.npy"))
N = len(tokens)
N_VAL, N_TEST = 64, 64  # contexts; taken from the end of the shuffled contexts (the cache's held-out end)
order = {"val": range(N - N_VAL - N_TEST, N - N_TEST), "test": range(N - N_TEST, N), "train": range(0, N - N_VAL - N_TEST)}
model, tok = load_model("smollm2-135m")
for split, idx in order.items():
    (root / split).mkdir(parents=True, exist_ok=True)
    for start in range(idx.start, idx.stop, 16):
        out = root / split / f"{start:05d}.npy"
        if out.exists():
            continue
        stop = min(start + 16, idx.stop)
        acts = torch.cat(list(iter_activations(model, tokens[start:stop], 8, 16, keep[start:stop])))
        np.save(str(out) + ".tmp.npy", acts.numpy())
        Path(str(out) + ".tmp.npy").rename(out)
        print(split, start, acts.shape, flush=True)
