#!/usr/bin/env python3
"""Time ONE SAE training step (forward + loss + backward + optimizer step + the
trainer's per-step bookkeeping) for several implementations on identical data.

Each (implementation, n_features) pair runs in its own subprocess so that peak
RSS (``resource.getrusage(...).ru_maxrss``) belongs to that implementation only.

Implementations (``--impl``):
  matmul              baseline: x[B,d] @ W_enc.T[d,F] + b_enc  (torch.addmm, forward only)
  sparsify-topk       EleutherAI sparsify SparseCoder (fused_encoder + embedding_bag decoder),
                      loss = FVU + auxk_alpha*AuxK (no dead latents), Adam + linear warmup,
                      decoder renorm + parallel-grad removal, exactly as sparsify.Trainer does.
  saelens-topk        SAE Lens TopKTrainingSAE.training_forward_pass (MSE + TopK aux loss),
                      firing stats, backward, clip_grad_norm_(1.0), Adam, constant LR scheduler,
                      exactly as SAETrainer._train_step does.  Dense activations (their default).
  saelens-topk-sparse same, with use_sparse_activations=True (COO activations + torch.sparse.mm).
  saelens-batchtopk   SAE Lens BatchTopKTrainingSAE (same trainer step + threshold EMA update).
  mcsae-topk / mcsae-feature_choice-zipf / mcsae-mutual_choice
                      mcsae.trainer.Trainer(TrainConfig(kind=topk|feature_choice|mutual_choice)).step:
                      exactly one step of mcsae training (aux="none").  Run with the project's
                      interpreter (``--mcsae-python``, PYTHONPATH=repo root); rows say
                      "skipped: ..." when mcsae.train is not importable.
  mcsae-{topk,feature_choice-zipf,mutual_choice}-static
                      the same training step through mcsae.static.StaticStep (fixed slots, no host
                      sync), run eagerly.
  mcsae-{topk,feature_choice-zipf,mutual_choice}-compiled
                      StaticStep compiled with torch.compile(fullgraph=True, dynamic=False); on CUDA
                      with mode="reduce-overhead" (CUDA graphs) unless --compile-mode says otherwise.
                      The first (warm-up) step includes the compilation: see the first_step_s column.

On a GPU (``--device cuda``) every row runs under bf16 autocast around its forward pass
(sparsify autocasts by itself; ``--no-autocast`` for fp32 elsewhere), with fp32 parameters and
optimizer state, and the memory columns report ``torch.cuda.max_memory_allocated``.

Example:
  benchmarks/.venv/bin/python benchmarks/bench_step.py --features 6144 24576 \
      --batch 4096 --d 768 --k 32 --steps 10 --json benchmarks/results.json
  python3 benchmarks/bench_step.py --device cuda --baseline-python python3 --mcsae-python python3
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
VENV_PY = HERE / ".venv" / "bin" / "python"

BASELINES = ["sparsify-topk", "saelens-topk", "saelens-batchtopk"]
OPTIONAL = ["saelens-topk-sparse"]
MCSAE = {"mcsae-topk": "topk", "mcsae-feature_choice-zipf": "feature_choice", "mcsae-mutual_choice": "mutual_choice"}
MCSAE_STEP = {f"{name}-{step}": (kind, step) for name, kind in MCSAE.items() for step in ("static", "compiled")}
MCSAE_STEP.update({name: (kind, "eager") for name, kind in MCSAE.items()})
ALL_IMPLS = ["matmul", *BASELINES, *OPTIONAL, *MCSAE, *(n for n in MCSAE_STEP if n not in MCSAE)]
DEFAULT_IMPLS = ["matmul", *BASELINES, *MCSAE]
REFERENCE = "sparsify-topk"


# --------------------------------------------------------------------------- data
def make_batches(torch, n_batches: int, batch: int, d: int, seed: int = 0):
    """Identical 'activation-like' fp32 data for every implementation: a shared
    per-dimension mean, anisotropic per-dimension scale (log-normal) and Gaussian
    noise, so the data has a non-zero mean (b_dec matters) and unequal variances."""
    g = torch.Generator().manual_seed(seed)
    mu = 0.5 * torch.randn(d, generator=g)
    scale = torch.exp(0.5 * torch.randn(d, generator=g))
    return [(mu + scale * torch.randn(batch, d, generator=g)).contiguous() for _ in range(n_batches)]


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# --------------------------------------------------------------------------- builders
# Each builder returns (step_fn, n_params, note). step_fn(x) runs one full training
# step and returns the scalar loss (a tensor; .item() is taken outside the timer
# only for the first/last step).


def build_matmul(torch, F, d, k, first_x, device="cpu", autocast=False):
    W = torch.randn(F, d, device=device) / d**0.5
    b = torch.zeros(F, device=device)

    def step(x):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            return torch.addmm(b, x, W.t())

    return step, F * d + F, "addmm forward only" + (", bf16 autocast" if autocast else "")


def build_sparsify(torch, F, d, k, first_x, device="cpu", autocast=False, auxk_alpha=1 / 32):
    if device == "cpu":
        os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
    from sparsify import SparseCoder, SparseCoderConfig
    from transformers import get_linear_schedule_with_warmup

    # SparseCoder.forward is wrapped in bf16 autocast on CUDA by sparsify itself
    sae = SparseCoder(d, SparseCoderConfig(num_latents=F, k=k), device=device, dtype=torch.float32)
    # sparsify.Trainer, Adam branch (bitsandbytes absent -> torch.optim.Adam)
    lr = 2e-4 / (sae.num_latents / (2**14)) ** 0.5
    opt = torch.optim.Adam([dict(params=sae.parameters(), lr=lr)])
    sched = get_linear_schedule_with_warmup(opt, 1000, 100_000)
    # global_step == 0: centre pre-activations by setting b_dec to the batch mean
    sae.b_dec.data = first_x.mean(0).to(sae.dtype)
    num_tokens_since_fired = torch.zeros(F, dtype=torch.long, device=device)
    dead_feature_threshold = 10_000_000

    def step(x):
        did_fire = torch.zeros(F, dtype=torch.bool, device=device)
        sae.set_decoder_norm_to_unit_norm()
        dead_mask = num_tokens_since_fired > dead_feature_threshold if auxk_alpha > 0 else None
        total_variance = (x - x.mean(0)).pow(2).sum()
        out = sae(x=x, y=x, dead_mask=dead_mask, total_variance=total_variance)
        did_fire[out.latent_indices.flatten()] = True
        loss = out.fvu + auxk_alpha * out.auxk_loss + out.multi_topk_fvu / 8
        loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        sched.step()
        with torch.no_grad():
            num_tokens_since_fired.add_(x.shape[0])
            num_tokens_since_fired[did_fire] = 0
        return loss.detach()

    n_params = sum(p.numel() for p in sae.parameters())
    from sparsify import utils as su

    return step, n_params, f"decoder={su.decoder_impl.__name__}, Adam lr={lr:.2e}, auxk_alpha={auxk_alpha}"


def build_saelens(torch, F, d, k, first_x, device="cpu", autocast=False, batchtopk=False, sparse=False):
    import contextlib

    from sae_lens.saes.sae import TrainStepInput
    from sae_lens.training.optim import get_lr_scheduler

    if batchtopk:
        from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE as Cls
        from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAEConfig as Cfg
    else:
        from sae_lens.saes.topk_sae import TopKTrainingSAE as Cls
        from sae_lens.saes.topk_sae import TopKTrainingSAEConfig as Cfg
    kw = dict(d_in=d, d_sae=F, k=k, dtype="float32", device=device)
    if sparse:
        kw["use_sparse_activations"] = True
    sae = Cls(Cfg(**kw))
    # SAETrainer defaults: Adam(lr=3e-4, betas=(0.9, 0.999)), constant scheduler
    opt = torch.optim.Adam(sae.parameters(), lr=3e-4, betas=(0.9, 0.999))
    sched = get_lr_scheduler(
        "constant", lr=3e-4, optimizer=opt, warm_up_steps=0, decay_steps=0,
        training_steps=100_000, lr_end=3e-5, num_cycles=1,
    )
    n_since_fired = torch.zeros(F, device=device)
    act_freq_scores = torch.zeros(F, device=device)
    # SAETrainer's cfg.autocast: bf16 autocast around the forward pass and firing statistics
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if autocast else contextlib.nullcontext
    dead_feature_window = 1000
    state = {"n": 0}

    def step(x):
        sae.train()
        with amp():
            out = sae.training_forward_pass(
                step_input=TrainStepInput(
                    sae_in=x,
                    dead_neuron_mask=(n_since_fired > dead_feature_window).bool(),
                    coefficients={},
                    n_training_steps=state["n"],
                    is_logging_step=False,
                )
            )
            with torch.no_grad():
                firing = out.feature_acts.bool().float()
                did_fire = firing.sum(-2).bool()
                if did_fire.is_sparse:
                    did_fire = did_fire.to_dense()
                n_since_fired.add_(1)
                n_since_fired[did_fire] = 0
                act_freq_scores.add_(firing.sum(0).to_dense() if firing.is_sparse else firing.sum(0))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        sched.step()
        state["n"] += 1
        return out.loss.detach()

    n_params = sum(p.numel() for p in sae.parameters())
    note = (f"rescale_acts_by_decoder_norm={sae.cfg.rescale_acts_by_decoder_norm}, "
            f"sparse_acts={getattr(sae.cfg, 'use_sparse_activations', False)}, aux_coef={sae.cfg.aux_loss_coefficient}"
            + (", bf16 autocast" if autocast else ""))
    return step, n_params, note


def build_mcsae(torch, F, d, k, first_x, kind, device="cpu", autocast=False, step_kind="eager", compile_mode=None):
    # Exactly what mcsae training runs per batch: mcsae.trainer.Trainer.step (scale the input, forward,
    # nmse (aux="none"), backward, remove_parallel_grads, clip_grad_norm_, Adam, normalize_decoder,
    # FeatureStats.update), after Trainer.initialize (input scale, b_dec = geometric median).
    from mcsae.trainer import TrainConfig, Trainer

    B = first_x.shape[0]
    cfg = TrainConfig(kind=kind, n_features=F, k=k, batch_size=B, n_tokens=B * 100, autocast=autocast)
    trainer = Trainer(cfg, d, device=device)  # no out_dir: it writes nothing
    trainer.initialize(first_x)

    def step(x):
        return trainer.step(x)["nmse"]

    note = f"Trainer.step kind={kind}, Adam fused={trainer.opt.defaults.get('fused')}"
    if step_kind != "eager":  # the same step through mcsae.static: fixed slots, no host sync
        from mcsae.static import StaticStep

        static = StaticStep(trainer, B)
        if step_kind == "compiled":
            mode = compile_mode if compile_mode is not None else ("reduce-overhead" if device.startswith("cuda") else None)
            static.compiled(mode=None if mode in (None, "default") else mode)
            note = f"StaticStep compiled (fullgraph, static shapes, mode={mode}) kind={kind}"
        else:
            note = f"StaticStep eager kind={kind}"

        def step(x):  # noqa: F811
            return static.step(x)[0]

    n_params = sum(p.numel() for p in trainer.sae.parameters())
    return step, n_params, note + (", bf16 autocast" if autocast else "")


# --------------------------------------------------------------------------- worker
def worker(args) -> dict:
    impl, F = args.worker, args.worker_features
    res = dict(impl=impl, features=F, batch=args.batch, d=args.d, k=args.k, python=Path(sys.executable).name, device=args.device)
    try:
        import torch
    except ImportError as e:  # pragma: no cover
        return {**res, "status": f"skipped: torch not importable ({e})"}
    if args.threads:
        torch.set_num_threads(args.threads)
    res.update(torch=torch.__version__, threads=torch.get_num_threads())
    torch.manual_seed(args.seed)
    dev = args.device
    cuda = dev.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        return {**res, "status": "skipped: CUDA not available"}
    if cuda:
        res.update(gpu=torch.cuda.get_device_name(dev))
    autocast = cuda and not args.no_autocast  # bf16 around the matmuls, fp32 parameters and optimizer state
    batches = [b.to(dev) for b in make_batches(torch, 4, args.batch, args.d, seed=args.seed)]
    kw = dict(device=dev, autocast=autocast)
    try:
        if impl == "matmul":
            step, n_params, note = build_matmul(torch, F, args.d, args.k, batches[0], **kw)
        elif impl == "sparsify-topk":
            step, n_params, note = build_sparsify(torch, F, args.d, args.k, batches[0], **kw)
        elif impl.startswith("saelens"):
            step, n_params, note = build_saelens(
                torch, F, args.d, args.k, batches[0], **kw,
                batchtopk=impl == "saelens-batchtopk", sparse=impl == "saelens-topk-sparse",
            )
        elif impl in MCSAE_STEP:
            kind, step_kind = MCSAE_STEP[impl]
            try:
                import mcsae.train  # noqa: F401
                if step_kind != "eager":
                    import mcsae.static  # noqa: F401
            except Exception as e:
                return {**res, "status": f"skipped: mcsae not available ({type(e).__name__}: {e})"}
            step, n_params, note = build_mcsae(torch, F, args.d, args.k, batches[0], kind, **kw, step_kind=step_kind,
                                               compile_mode=args.compile_mode)
        else:
            return {**res, "status": f"skipped: unknown impl {impl}"}
    except ImportError as e:
        return {**res, "status": f"skipped: import failed ({e})"}
    res.update(n_params=n_params, note=note)

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
        gpu_before = torch.cuda.memory_allocated(dev) / 2**20
    rss_before = rss_mib()
    load_start = os.getloadavg()[0]
    times, losses = [], []
    first_step_s = None
    t_start = time.perf_counter()
    n_total = args.warmup + args.steps
    for i in range(n_total):
        x = batches[i % len(batches)]
        sync()
        t0 = time.perf_counter()
        loss = step(x)
        sync()
        dt = time.perf_counter() - t0
        if i == 0:
            first_step_s = dt  # includes compilation for the compiled rows
        if i >= args.warmup:
            times.append(dt)
        if impl != "matmul" and (i == 0 or i == n_total - 1):
            losses.append(float(loss))
        # adaptive budget: keep at least --min-steps timed steps
        if (i >= args.warmup + args.min_steps - 1 and args.time_budget
                and time.perf_counter() - t_start > args.time_budget):
            break
    ms = sorted(t * 1e3 for t in times)
    q = statistics.quantiles(ms, n=4, method="inclusive") if len(ms) >= 2 else [ms[0]] * 3
    res.update(
        status="ok",
        steps=len(ms),
        warmup=args.warmup,
        median_ms=statistics.median(ms),
        q25_ms=q[0],
        q75_ms=q[2],
        min_ms=ms[0],
        tokens_per_s=args.batch / (statistics.median(ms) / 1e3),
        rss_before_steps_mib=rss_before,
        peak_rss_mib=maxrss_mib(),
        step_peak_delta_mib=maxrss_mib() - rss_before,
        first_step_s=first_step_s,
        loss_first=losses[0] if losses else None,
        loss_last=losses[-1] if losses else None,
        loadavg_start=load_start,  # 1-min load average: >> threads means contended timings
        loadavg_end=os.getloadavg()[0],
    )
    if cuda:  # on the GPU, memory columns report the device's allocator instead of host RSS
        peak = torch.cuda.max_memory_allocated(dev) / 2**20
        res.update(gpu_mem_before_steps_mib=gpu_before, peak_gpu_mib=peak, step_peak_gpu_delta_mib=peak - gpu_before)
    return res


# --------------------------------------------------------------------------- parent
def interpreter_for(impl: str, args) -> tuple[str, dict]:
    env = dict(os.environ)
    if impl in MCSAE_STEP:
        env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        return args.mcsae_python, env
    return args.baseline_python, env


def run_one(impl: str, F: int, args) -> dict:
    py, env = interpreter_for(impl, args)
    cmd = [py, str(Path(__file__).resolve()), "--worker", impl, "--worker-features", str(F),
           "--batch", str(args.batch), "--d", str(args.d), "--k", str(args.k),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--min-steps", str(args.min_steps),
           "--time-budget", str(args.time_budget), "--seed", str(args.seed), "--threads", str(args.threads),
           "--device", args.device] + (["--no-autocast"] if args.no_autocast else []) + (
               ["--compile-mode", args.compile_mode] if args.compile_mode else [])
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return dict(impl=impl, features=F, status=f"failed: timeout after {args.timeout}s")
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    lines = (p.stderr or p.stdout).strip().splitlines()
    errs = [ln for ln in lines if re.match(r"^[\w.]*(Error|Exception)\b", ln)]
    msg = (errs or lines[-1:] or ["no output"])[-1]
    return dict(impl=impl, features=F, status=f"failed (rc={p.returncode}): {msg[:160]}")


def fmt_table(results: list[dict]) -> str:
    ref = {r["features"]: r["median_ms"] for r in results if r["impl"] == REFERENCE and r.get("status") == "ok"}
    mm = {r["features"]: r["median_ms"] for r in results if r["impl"] == "matmul" and r.get("status") == "ok"}
    head = ("| impl | F | median ms | IQR ms | steps | tokens/s | vs sparsify-topk | step / enc-matmul "
            "| peak mem MiB | step peak Δ MiB | threads | first step s | loss first→last |")
    lines = [head, "|" + "|".join(["---"] * (head.count("|") - 1)) + "|"]
    for r in results:
        if r.get("status") != "ok":
            lines.append(f"| {r['impl']} | {r['features']} | {r.get('status')} |" + " |" * 10)
            continue
        F, med = r["features"], r["median_ms"]
        vs = f"{med / ref[F]:.2f}×" if F in ref else "–"
        vm = f"{med / mm[F]:.1f}×" if F in mm and r["impl"] != "matmul" else ("1" if r["impl"] == "matmul" else "–")
        loss = (f"{r['loss_first']:.3g}→{r['loss_last']:.3g}" if r.get("loss_first") is not None else "–")
        gpu = "peak_gpu_mib" in r  # GPU rows: device memory (torch.cuda.max_memory_allocated), not host RSS
        peak, delta = (r["peak_gpu_mib"], r["step_peak_gpu_delta_mib"]) if gpu else (r["peak_rss_mib"], r["step_peak_delta_mib"])
        lines.append(
            f"| {r['impl']} | {F} | {med:.1f} | {r['q25_ms']:.1f}–{r['q75_ms']:.1f} | {r['steps']} "
            f"| {r['tokens_per_s']:,.0f} | {vs} | {vm} | {peak:.0f}{' (GPU)' if gpu else ''} "
            f"| {delta:.0f} | {r['threads']} | {r.get('first_step_s') or 0:.1f} | {loss} |"
        )
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--features", type=int, nargs="+", default=[6144, 24576])
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10, help="timed steps (upper bound, see --time-budget)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--min-steps", type=int, default=3, help="timed steps kept even past --time-budget")
    ap.add_argument("--time-budget", type=float, default=60.0,
                    help="seconds per (impl, F) after which timing stops early (0 = never)")
    ap.add_argument("--timeout", type=float, default=600.0, help="hard limit per subprocess, seconds")
    ap.add_argument("--impl", nargs="+", default=DEFAULT_IMPLS, choices=ALL_IMPLS)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 = torch default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:i]; on CUDA every row runs bf16 autocast "
                    "around the forward pass (sparsify does so itself) unless --no-autocast")
    ap.add_argument("--no-autocast", action="store_true", help="fp32 on CUDA (sparsify still autocasts)")
    ap.add_argument("--compile-mode", default=None,
                    help="torch.compile mode of the mcsae-*-compiled rows (default: reduce-overhead on CUDA, "
                         "default on CPU; 'default' forces the plain mode)")
    ap.add_argument("--baseline-python", default=str(VENV_PY) if VENV_PY.exists() else sys.executable,
                    help="interpreter for matmul/sparsify/SAE Lens rows (default: benchmarks/.venv)")
    ap.add_argument("--mcsae-python", default=sys.executable,
                    help="interpreter for mcsae rows (run with PYTHONPATH=repo root; default: this one)")
    ap.add_argument("--json", help="write all results to this JSON file")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--worker-features", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        res = worker(args)
        print("RESULT " + json.dumps(res), flush=True)
        return

    results = []
    for F in args.features:
        for impl in args.impl:
            r = run_one(impl, F, args)
            results.append(r)
            msg = (f"{r['median_ms']:.1f} ms median over {r['steps']} steps" if r.get("status") == "ok"
                   else r.get("status"))
            print(f"[{impl} F={F}] {msg}", file=sys.stderr, flush=True)
    where = "fp32 CPU" if args.device == "cpu" else (
        f"{args.device} ({next((r['gpu'] for r in results if 'gpu' in r), '?')}), "
        + ("fp32" if args.no_autocast else "bf16 autocast, fp32 parameters"))
    print(f"\nB={args.batch} d={args.d} k={args.k} {where}; warm-up {args.warmup}; "
          f"sparsify/SAE Lens: {args.baseline_python}; mcsae: {args.mcsae_python}\n")
    print(fmt_table(results))
    loads = [r[k] for r in results for k in ("loadavg_start", "loadavg_end") if k in r]
    if loads:
        print(f"\n1-min load average during the workers: {min(loads):.1f}–{max(loads):.1f} "
              f"(machine has {os.cpu_count()} CPUs; load well above the thread count means contended timings)")
    if args.json:
        recorded = {k: v for k, v in vars(args).items() if not k.startswith("worker")}
        for k in ("baseline_python", "mcsae_python"):  # an interpreter by name, never a path of this machine
            recorded[k] = Path(recorded[k]).name if Path(recorded[k]).is_absolute() else recorded[k]
        tmp = Path(f"{args.json}.tmp-{os.getpid()}")  # written whole, then renamed: a killed run leaves the old file
        tmp.write_text(json.dumps(dict(args=recorded, results=results), indent=2))
        os.replace(tmp, args.json)


if __name__ == "__main__":
    main()
