"""Markdown tables of the regime study's results (figures/regime/data/*.json), for figures/regime/README.md."""
import json
import statistics as st
import sys
from collections import defaultdict
from pathlib import Path

data = Path(sys.argv[1] if len(sys.argv) > 1 else "figures/regime/data")


def init_table() -> None:
    d = json.loads((data / "init.json").read_text())
    g = defaultdict(list)
    for r in d["rows"]:
        g[(r["n_features"], r["batch_size"], r["variant"], r["encoder_init"])].append(r)
    print("| F | B | kind | start | NMSE next batch (mean ± sd, 2 seeds) | gain | max L0 | tokens with L0 = 0 | features used |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (F, B, v, i), rs in sorted(g.items()):
        n = [r["next_batch"]["nmse"] for r in rs]
        print(f"| {F} | {B} | {v} | {i} | {st.mean(n):.3f} ± {st.pstdev(n):.3f} | {st.mean(r['gain'] for r in rs):.3f} | "
              f"{max(r['init_batch']['l0_max'] for r in rs):.0f} | {st.mean(r['init_batch']['l0_zero_frac'] for r in rs):.1%} | "
              f"{st.mean(r['init_batch']['features_used_frac'] for r in rs):.1%} |")
    print()
    nm = d["norms"]
    print(f"Norms (median {nm['median_norm']:.1f}, max {nm['max_over_median']:.1f}x the median): " + "; ".join(
        f"{k} median: {v['token_frac']:.2%} of tokens, {v['variance_frac']:.1%} of the variance" for k, v in nm.items() if k.startswith(">")))
    print()


def run_tables() -> None:
    for path in sorted(data.glob("[A-Z]_*.json")):
        d = json.loads(path.read_text())
        c = d["common"]
        print(f"**{d['group']}** (F = {c['n_features']}, B = {c['batch_size']}, {c['n_tokens']} tokens, k = {c['k']}, "
              f"dead window {c['dead_tokens']} tokens, seed {c['seed']}; {d['seconds'] / 60:.0f} min)")
        print()
        print("| run | val NMSE | test NMSE | threshold-mode val NMSE (L0) | dead | dying | never fired on val |")
        print("|---|---|---|---|---|---|---|")
        for r in d["runs"]:
            v, t = r["val"], r.get("test", {})
            thr = f"{v['threshold_nmse']:.4f} ({v['threshold_l0_mean']:.1f})" if "threshold_nmse" in v else ""
            print(f"| {r['name']} | {v['nmse']:.4f} | {t.get('nmse', float('nan')):.4f} | {thr} | {r['dead_frac']:.1%} | "
                  f"{(r.get('dying_frac') or 0):.1%} | {v['dead_frac_eval']:.1%} |")
        print()


init_table()
run_tables()
