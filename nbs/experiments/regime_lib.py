"""Helpers of the regime study (nbs/experiments/regime_study.ipynb): measurements at initialisation, short
training runs on an activation cache with a validation / test split of its held-out contexts, and their results
as JSON. Run as a script, it trains one group of SAEs (resumable) and writes figures/regime/data/<group>.json."""
from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from mcsae.evaluate import reconstruction_metrics, save_results, training_statistics
from mcsae.losses import nmse
from mcsae.sae import SAE, VARIANTS
from mcsae.store import open_cache
from mcsae.train import CacheSource, TensorSource, TrainConfig, Trainer, read_metrics, train

MC, FC, FCU = "mutual_choice", "feature_choice-zipf", "feature_choice-uniform"  # variant ids (mcsae.sae.VARIANTS)


def norm_statistics(x: torch.Tensor, multiples=(2, 3, 5, 10)) -> dict:
    "Share of tokens, and of the centred variance, above c x the median norm, for each c."
    norms = x.norm(dim=1)
    centred = (x - x.mean(0)).pow(2).sum(1)
    med = norms.median().item()
    out = {"median_norm": med, "max_over_median": norms.max().item() / med, "n": len(x)}
    for c in multiples:
        above = norms > c * med
        out[f">{c}x"] = {"token_frac": above.float().mean().item(),
                         "variance_frac": (centred[above].sum() / centred.sum()).item()}
    return out


@torch.no_grad()
def initial_state(variant: str, x0: torch.Tensor, x1: torch.Tensor, n_features: int, k: int, encoder_init: str,
                  seed: int, zipf_s: float = 0.75, outlier_norm: float = 0.0) -> dict:
    "NMSE and per-token L0 of an untrained SAE initialised on batch x0, on x0 and on a fresh batch x1."
    cfg = TrainConfig(**VARIANTS[variant][0], n_features=n_features, k=k, batch_size=len(x0), n_tokens=len(x0),
                      zipf_s=zipf_s, encoder_init=encoder_init, outlier_norm=outlier_norm, seed=seed)
    t = Trainer(cfg, x0.shape[1], Path(tempfile.gettempdir()) / "unused")  # writes nothing there
    t.initialize(x0)
    t.sae.eval()
    res = {"variant": variant, "n_features": n_features, "k": k, "batch_size": len(x0), "encoder_init": encoder_init,
           "seed": seed, "gain": t.encoder_gain}
    for name, x in (("init_batch", x0), ("next_batch", x1)):
        x = x * t.scale
        out = t.sae(x)
        l0 = out.codes.l0().float()
        res[name] = {"nmse": nmse(x, out.x_hat).item(), "l0_max": l0.max().item(), "l0_mean": l0.mean().item(),
                     "l0_p99": torch.quantile(l0, 0.99).item(), "l0_zero_frac": (l0 == 0).float().mean().item(),
                     "features_used_frac": (torch.bincount(out.codes.alloc.feature, minlength=n_features) > 0).float().mean().item()}
    return res


def splits(cache, n_val: int) -> tuple[torch.Tensor, torch.Tensor]:
    "Validation (first n_val held-out activations) and test (the rest) of the cache's eval split."
    ev = cache.read("eval")
    return ev[:n_val], ev[n_val:]


def evaluate(sae: SAE, x: torch.Tensor, batch_size: int) -> dict:
    "Pooled NMSE, L0 and never-fired fraction of an SAE on activations x, in batches."
    batches = [x[i:i + batch_size] for i in range(0, len(x) - batch_size + 1, batch_size)]
    m = reconstruction_metrics(sae, batches)
    res = {"nmse": m["nmse"], "l0_mean": m["l0_mean"], "l0_max": m["l0_quantiles"]["1.0"],
           "dead_frac_eval": m["dead_frac_eval"]}
    if sae.cfg.kind != "topk":
        t = reconstruction_metrics(sae, batches, mode="threshold")
        res.update(threshold_nmse=t["nmse"], threshold_l0_mean=t["l0_mean"])
    return res


def chunk_data(acts_dir: str, max_train_files: int | None = None) -> tuple[TensorSource, torch.Tensor, torch.Tensor, list]:
    "Train source, validation and test activations from an incremental extraction (regime_extract.py)."
    acts_dir = Path(acts_dir)
    read = lambda files: torch.cat([torch.from_numpy(np.load(f)) for f in files]).float()
    files = sorted((acts_dir / "train").glob("[0-9]*[0-9].npy"))[:max_train_files]
    return (TensorSource(read(files)), read(sorted((acts_dir / "val").glob("[0-9]*[0-9].npy"))),
            read(sorted((acts_dir / "test").glob("[0-9]*[0-9].npy"))), [f.name for f in files])


def run_group(group: str, runs: list[dict], common: dict, cache_dir: str, out_dir: str, data_dir: str,
              n_val: int = 32768, with_test: bool = True, progress: bool = False, max_train_files: int | None = None) -> dict:
    "Train the runs of one group on one stream (resumable), evaluate them, write <data_dir>/<group>.json."
    cfgs = [TrainConfig(**{**common, **VARIANTS[r["variant"]][0], **r.get("cfg", {})}, name=r["name"]) for r in runs]
    t0 = time.time()
    if (Path(cache_dir) / "manifest.json").exists():
        cache = open_cache(cache_dir)
        source, files = CacheSource(cache), None
        val, test = splits(cache, n_val)
    else:  # an incremental extraction: train/, val/, test/ folders of .npy chunks
        source, val, test, files = chunk_data(cache_dir, max_train_files)
    paths = train(cfgs, source, Path(out_dir) / group, resume=True, progress=progress)
    rows = []
    for r, cfg, p in zip(runs, cfgs, paths):
        sae = SAE.load(p)
        stats = training_statistics(Path(p).parent)
        curve = [{k: m[k] for k in ("step", "tokens", "nmse", "l0", "dead_frac") if k in m} for m in read_metrics(Path(p).parent)]
        row = {"name": r["name"], "variant": r["variant"], "config": asdict(cfg), "val": evaluate(sae, val, cfg.batch_size),
               "dead_frac": stats.get("dead_frac_train"), "dying_frac": stats.get("dying_frac_train"),
               "dead_window_tokens": cfg.dead_tokens, "curve": curve, **r.get("tags", {})}
        if with_test:
            row["test"] = evaluate(sae, test, cfg.batch_size)
        rows.append(row)
    res = {"group": group, "common": common, "cache": str(cache_dir), "n_val": len(val), "n_test": len(test),
           "train_files": files, "train_tokens_available": None if files is None else len(source.data),
           "seconds": time.time() - t0, "runs": rows}
    save_results(res, Path(data_dir) / f"{group}.json")
    return res


def groups(n_features: int = 2048, batch_size: int = 2048, steps: int = 120, dead_tokens: int = 102_400,
           large_features: int = 4096, zipf_s: float = 0.75, warmup_steps: int = 20) -> dict[str, dict]:
    "The training groups of the study: name -> {common TrainConfig fields, runs}; each group shares one stream."
    common = dict(n_features=n_features, k=32, batch_size=batch_size, n_tokens=batch_size * steps, dead_tokens=dead_tokens,
                  warmup_steps=warmup_steps, zipf_s=zipf_s, log_every=max(1, steps // 30), checkpoint_every=max(1, steps // 5),
                  seed=0)

    def r(name, variant, **cfg):
        return {"name": name, "variant": variant, "cfg": cfg}

    init = [r(f"{v}-{i}", v, encoder_init=i) for v in ("topk", MC, FC) for i in ("tied", "lstsq")]
    return {
        "A_init": {"common": common, "runs": init},  # H1: tied vs least-squares-scaled encoder
        "A_init_s1": {"common": {**common, "seed": 1}, "runs": init},  # the same, second seed
        "B_fixes": {"common": common, "runs":  # H2: outlier clipping; H3: longer warm-up instead of a scaled init
                    [r(f"{v}-lstsq-clip5", v, encoder_init="lstsq", outlier_norm=5.0) for v in ("topk", MC, FC)]
                    + [r(f"{MC}-lstsq-clip2", MC, encoder_init="lstsq", outlier_norm=2.0)]
                    + [r(f"{v}-tied-warm100", v, encoder_init="tied", warmup_steps=5 * warmup_steps) for v in (MC, FC)]},
        "C_aux": {"common": {**common, "n_features": large_features}, "runs":  # dead regime: MC with / without aux losses
                  [r("topk-lstsq", "topk", encoder_init="lstsq"), r(f"{MC}-lstsq", MC, encoder_init="lstsq"),
                   r(f"{MC}-lstsq-aux_k", MC, encoder_init="lstsq", aux="aux_k"),
                   r(f"{MC}-lstsq-aux_zipf", MC, encoder_init="lstsq", aux="aux_zipf")]},
        "C_ctrl": {"common": {**common, "n_features": large_features}, "runs":  # controls of C: tied MC, FC
                   [r(f"{MC}-tied", MC, encoder_init="tied"), r(f"{FC}-lstsq", FC, encoder_init="lstsq")]},
        "D_fc": {"common": common, "runs":  # H4: Zipf exponent, uniform capacities, rank refresh
                 [r(f"{FC}-lstsq-s1.0", FC, encoder_init="lstsq", zipf_s=1.0),
                  r(f"{FC}-lstsq-s0.5", FC, encoder_init="lstsq", zipf_s=0.5),
                  r(f"{FCU}-lstsq", FCU, encoder_init="lstsq"),
                  r(f"{FC}-lstsq-rank10", FC, encoder_init="lstsq", rank_every=10)]},
    }


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("group", help="a name of groups()")
    ap.add_argument("--cache", default="runs/regime/cache")
    ap.add_argument("--out", default="runs/regime/saes")
    ap.add_argument("--data", default="figures/regime/data")
    ap.add_argument("--max-train-files", type=int, default=None, help="incremental extraction: use this many train chunks")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--n-features", type=int, default=2048)
    ap.add_argument("--large-features", type=int, default=4096)
    ap.add_argument("--batch-size", type=int, default=2048)
    ap.add_argument("--dead-tokens", type=int, default=102_400)
    a = ap.parse_args()
    torch.set_num_threads(1)
    g = groups(n_features=a.n_features, batch_size=a.batch_size, steps=a.steps, dead_tokens=a.dead_tokens,
               large_features=a.large_features)[a.group]
    res = run_group(a.group, g["runs"], g["common"], a.cache, a.out, a.data, progress=True, max_train_files=a.max_train_files)
    for r in res["runs"]:
        print(f"{r['name']:32s} val NMSE {r['val']['nmse']:.4f}  dead {r['dead_frac']}  dying {r.get('dying_frac')}")
