"""Initial state of untrained SAEs for the regime study, measured on the probe (regime_probe.py): NMSE, per-token L0,
features used and the least-squares gain of each kind, start, dictionary size and seed at k = 32, written to
figures/regime/data/init.json; rows of dictionary sizes not measured again are kept. The committed file:
`--features 4096 16384 --batch 4096`, then `--features 2048 --batch 2048` (the cpu preset's batch)."""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # regime_lib.py lives next to this script
from regime_lib import FC, FCU, MC, initial_state, norm_statistics

from mcsae.evaluate import save_results

ap = argparse.ArgumentParser(description=__doc__)
ap.add_argument("--features", type=int, nargs="+", default=[4096, 16384], help="dictionary sizes to measure")
ap.add_argument("--batch", type=int, default=4096, help="tokens per batch (initialised on one, measured on the next)")
ap.add_argument("--probe", default="runs/regime/probe.pt")
ap.add_argument("--out", default="figures/regime/data/init.json")
a = ap.parse_args()
torch.set_num_threads(1)
acts = torch.load(a.probe)
x0, x1 = acts[:a.batch], acts[a.batch:2 * a.batch]
out = Path(a.out)
data = json.loads(out.read_text()) if out.exists() else {"rows": []}
data["rows"] = [r for r in data["rows"] if r["n_features"] not in a.features]
data["norms"] = norm_statistics(acts)
for F in a.features:
    for variant in ("topk", MC, FC, FCU):
        for init in ("tied", "lstsq"):
            for seed in (0, 1):
                r = initial_state(variant, x0, x1, F, 32, init, seed)
                data["rows"].append(r)
                print(F, variant, init, seed, f"gain {r['gain']:.3f} nmse {r['next_batch']['nmse']:.3f} "
                      f"l0max {r['init_batch']['l0_max']:.0f} used {r['init_batch']['features_used_frac']:.3f}", flush=True)
batches = sorted({(r["n_features"], r["batch_size"]) for r in data["rows"]})
data["source"] = (f"probe: {len(acts)} activations of SmolLM2-135M block 8 (corpus shuffle seed 1); "
                  + ", ".join(f"F={F} at B={B}" for F, B in batches))
save_results(data, out)
