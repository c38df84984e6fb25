"""The fixed-slot, sync-free step (mcsae.static) against the references and the eager Trainer.step.

* fixed-slot selections equal the reference masks (random, tied, zero-heavy, bf16; every kind);
* losses, gradients and weights after several steps equal the eager step's (same init, same batches);
* the step compiles with fullgraph=True, dynamic=False and never recompiles (aot_eager: fast, in CI);
  the inductor build is slow on this 2-core CPU and runs only with MCSAE_SLOW=1;
* on CUDA (skipped without a GPU): the step under torch.cuda.set_sync_debug_mode("error").
"""
import os
import tempfile

import pytest
import torch
import torch._dynamo

from mcsae.allocation import feature_choice_mask, mutual_choice_mask, topk_mask
from mcsae.losses import FeatureStats, nmse
from mcsae.sae import SAE, SAEConfig
from mcsae.static import (StaticStep, capacity_plan, feature_choice_slots, metrics, mutual_choice_slots,
                          plan_capacities, static_deficit_weights, topk_slots)
from mcsae.train import TrainConfig, Trainer

SLOW = os.environ.get("MCSAE_SLOW") == "1"


def _cases(B, F, seed):
    g = torch.Generator().manual_seed(seed)
    yield "random", torch.randn(B, F, generator=g).relu()
    yield "ties", torch.randint(0, 3, (B, F), generator=g).float()
    yield "coarse", ((torch.randn(B, F, generator=g).relu() * 3).round() / 3)
    z = torch.zeros(B, F)
    z[torch.rand(B, F, generator=g) < 0.02] = 1.0
    yield "zero-heavy", z
    yield "zeros", torch.zeros(B, F)
    yield "bf16", torch.randn(B, F, generator=g).relu().bfloat16()
    yield "negative", torch.randn(B, F, generator=g)  # pre-ReLU values: never selected when <= 0


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("shape", [(16, 40), (33, 64), (5, 7)])
def test_topk_slots_equal_reference(seed, shape):
    B, F = shape
    for name, z in _cases(B, F, seed):
        for k in sorted({1, 3, F // 2, F - 1, F}):
            s = topk_slots(z, k, chunk=2 * F + 1)
            assert s.token.numel() == B * k and s.feature.numel() == B * k
            assert torch.equal(s.to_mask(), topk_mask(z, k)), (name, k)
            assert torch.equal(s.offsets, torch.arange(B + 1) * k)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("shape", [(16, 40), (33, 64), (5, 7)])
def test_mutual_choice_slots_equal_reference(seed, shape):
    B, F = shape
    for name, z in _cases(B, F, seed):
        for budget in sorted({0, 1, B, 4 * B, B * F // 2, B * F}):
            s = mutual_choice_slots(z, budget)
            assert s.token.numel() == budget
            assert torch.equal(s.to_mask(), mutual_choice_mask(z, budget)), (name, budget)
            assert bool((s.token.diff() >= 0).all()) and s.offsets[-1] == budget


@pytest.mark.parametrize("capacities", ["zipf", "uniform"])
@pytest.mark.parametrize("shape,k", [((16, 40), 3), ((64, 50), 8), ((7, 30), 1), ((9, 12), 11)])
def test_feature_choice_slots_equal_reference(capacities, shape, k):
    B, F = shape
    g = torch.Generator().manual_seed(k)
    for name, z in _cases(B, F, k):
        sae = SAE(SAEConfig(d_in=4, n_features=F, k=k, capacities=capacities, zipf_s=1.3))
        sae.ranks.copy_(torch.randperm(F, generator=g) + 1)
        for max_entries in (B, 5 * B, 2**22):  # one column per bucket piece, a few, all
            plan = capacity_plan(sae, B, max_entries=max_entries)
            caps = sae.capacities(B)
            assert torch.equal(plan_capacities(plan, sae.ranks), caps)
            s = feature_choice_slots(z, plan, sae.ranks)
            assert s.token.numel() == int(caps.sum()) == k * B
            assert torch.equal(s.to_mask(), feature_choice_mask(z, caps)), (name, max_entries)


def test_static_deficit_weights_equal_eager():
    g = torch.Generator().manual_seed(3)
    for trial in range(20):
        stats = FeatureStats(64, dead_tokens=100)
        stats.density.copy_(torch.rand(64, generator=g, dtype=torch.float64) ** 4)
        stats.density[torch.rand(64, generator=g) < 0.3] = 0
        stats.tokens_since_fired.copy_(torch.randint(0, 200, (64,), generator=g))
        if trial % 5 == 0:
            stats.tokens_since_fired.fill_(500)  # everything dead: the dead indicator
        if trial % 5 == 1:
            stats.tokens_since_fired[:63] = 500  # one alive feature: too few for a fit
        assert torch.allclose(static_deficit_weights(stats), stats.deficit_weights(), atol=1e-6), trial


def _data(n=2048, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    dirs = torch.nn.functional.normalize(torch.randn(48, d, generator=g), dim=1)
    idx = torch.multinomial((1.0 / torch.arange(1, 49)).expand(n, -1), 3, generator=g)
    return 2 * torch.einsum("np,npd->nd", torch.rand(n, 3, generator=g) + 0.5, dirs[idx]) + 0.3


def _trainers(kind, aux, capacities="zipf", B=64, n=2, **kw):
    cfg = TrainConfig(kind=kind, aux=aux, capacities=capacities, n_features=96, k=4, batch_size=B, n_tokens=B * 50,
                      lr=3e-3, warmup_steps=2, dead_tokens=B * 2, rank_every=2, **kw)
    ts = [Trainer(cfg, 16, tempfile.mkdtemp()) for _ in range(n)]
    for t in ts:
        t.initialize(_data()[:512])
    return ts


CONFIGS = [(kind, aux, "zipf") for kind in ("topk", "feature_choice", "mutual_choice")
           for aux in ("none", "aux_k", "aux_zipf")] + [("feature_choice", "aux_k", "uniform")]


@pytest.mark.parametrize("kind,aux,capacities", CONFIGS)
def test_static_step_equals_eager_step(kind, aux, capacities):
    eager, twin = _trainers(kind, aux, capacities)
    static = StaticStep(twin, 64)
    X = _data()
    for i in range(8):
        x = X[i * 64:(i + 1) * 64]
        m = eager.step(x)
        got = metrics(twin, static.step(x))
        assert got["nmse"] == pytest.approx(m["nmse"], rel=1e-5, abs=1e-6), i
        assert got["aux"] == pytest.approx(m["aux"], rel=1e-4, abs=1e-6), i
        assert got["l0"] == m["l0"] and got["lr"] == m["lr"] and twin.step_idx == eager.step_idx
    for (name, a), b in zip(eager.sae.state_dict().items(), twin.sae.state_dict().values()):
        assert torch.allclose(a.double(), b.double(), rtol=1e-4, atol=2e-6), name
    for (name, a), b in zip(eager.stats.state_dict().items(), twin.stats.state_dict().values()):
        assert torch.allclose(a.double(), b.double(), rtol=1e-6, atol=1e-9), name
    sa, sb = eager.opt.state_dict(), twin.opt.state_dict()  # the shared Adam state: checkpoints look the same
    for i, st in sa["state"].items():
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.allclose(st[key].double(), sb["state"][i][key].double(), rtol=1e-3, atol=1e-9), (i, key)


@pytest.mark.parametrize("kind,aux", [("topk", "aux_k"), ("feature_choice", "aux_zipf"), ("mutual_choice", "aux_k")])
def test_static_gradients_equal_autograd(kind, aux):
    eager, twin = _trainers(kind, aux)
    for t in (eager, twin):  # a trained-looking state: some dead features, densities to fit
        t.stats.tokens_since_fired[::3] = 10**6
        t.stats.density.copy_(torch.linspace(1, 0.001, 96, dtype=torch.float64) ** 2)
        t.stats.n_batches += 1
        t.sae.b_enc.data.normal_(0, 0.3, generator=torch.Generator().manual_seed(0))
    x = _data()[:64] * eager.scale
    sae = eager.sae
    sae.train()
    out = sae(x)
    loss_rec, loss_aux = nmse(x, out.x_hat), eager.aux_loss(x, out)
    (loss_rec + loss_aux).backward()
    static = StaticStep(twin, 64)
    s_rec, s_aux, grads, *_ = static.gradients(x)
    assert loss_aux.item() > 0
    assert s_rec.item() == pytest.approx(loss_rec.item(), rel=1e-5)
    assert s_aux.item() == pytest.approx(loss_aux.item(), rel=1e-5)
    for (name, p), g in zip(sae.named_parameters(), grads):
        assert torch.allclose(g, p.grad, rtol=1e-4, atol=1e-7), (name, (g - p.grad).abs().max())


def test_unused_slots_receive_no_gradient():
    (t,) = _trainers("topk", "none", n=1)
    with torch.no_grad():
        t.sae.b_enc.fill_(-50.0)  # every affinity is 0: every slot unused
    static = StaticStep(t, 64)
    x = _data()[:64] * t.scale
    _, _, grads, aff, s, v = static.gradients(x)
    assert not bool(s.valid.any()) and bool((v == 0).all())
    g_W_dec, g_W_enc, g_b_enc, g_b_dec = grads
    assert bool((g_W_enc == 0).all()) and bool((g_b_enc == 0).all()) and bool((g_W_dec == 0).all())


def test_static_and_eager_steps_alternate():
    eager, twin = _trainers("mutual_choice", "aux_k")
    static = StaticStep(twin, 64)
    X = _data()
    for i in range(6):
        x = X[i * 64:(i + 1) * 64]
        m = eager.step(x)
        got = twin.step(x) if i % 2 else metrics(twin, static.step(x))
        assert got["nmse"] == pytest.approx(m["nmse"], rel=1e-5)
    assert torch.allclose(eager.sae.W_enc, twin.sae.W_enc, rtol=1e-4, atol=1e-6)


def test_public_pair_dots_when_the_private_kernel_is_missing(monkeypatch):
    import mcsae.static
    from mcsae.sae import pair_dots_reference

    monkeypatch.setattr(mcsae.static, "private_op_works", lambda: False)  # as if torch had dropped the private op
    eager, twin = _trainers("feature_choice", "aux_k")
    static = StaticStep(twin, 64)
    assert static.pair_dots is pair_dots_reference
    X = _data()
    for i in range(3):
        x = X[i * 64:(i + 1) * 64]
        m = eager.step(x)
        assert metrics(twin, static.step(x))["nmse"] == pytest.approx(m["nmse"], rel=1e-5), i
    assert torch.allclose(eager.sae.W_enc, twin.sae.W_enc, rtol=1e-4, atol=1e-6)


def test_bad_batch_shape_is_one_line_error():
    (t,) = _trainers("topk", "none", n=1)
    with pytest.raises(ValueError, match="built for batches of shape"):
        StaticStep(t, 64).step(torch.randn(32, 16))


def _compiled_against_eager(kind, aux, **options):
    "Four steps of an eager trainer and of a compiled StaticStep twin (no recompile allowed); the two trainers."
    torch._dynamo.reset()
    eager, twin = _trainers(kind, aux)
    static = StaticStep(twin, 64).compiled(**options)
    X = _data()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for i in range(4):
            x = X[i * 64:(i + 1) * 64]
            m = eager.step(x)
            got = metrics(twin, static.step(x))
            assert got["nmse"] == pytest.approx(m["nmse"], rel=1e-5), i
    torch._dynamo.reset()
    return eager, twin


@pytest.mark.parametrize("kind,aux", [("topk", "aux_k"), ("feature_choice", "aux_zipf"), ("mutual_choice", "none")])
def test_step_compiles_to_one_graph_without_recompiles(kind, aux):
    "fullgraph=True fails on any graph break: .item(), .tolist(), data-dependent shapes, Python branches on tensors."
    _compiled_against_eager(kind, aux, backend="aot_eager")


@pytest.mark.skipif(not SLOW, reason="inductor's C++ build takes minutes on a 2-core CPU; set MCSAE_SLOW=1")
@pytest.mark.parametrize("kind,aux", [("topk", "aux_k"), ("feature_choice", "aux_zipf"), ("mutual_choice", "none")])
def test_inductor_compiled_step_equals_eager(kind, aux):
    eager, twin = _compiled_against_eager(kind, aux)
    for (name, a), b in zip(eager.sae.state_dict().items(), twin.sae.state_dict().values()):
        assert torch.allclose(a.double(), b.double(), rtol=1e-4, atol=2e-6), name


# ---- CUDA (skipped here) ------------------------------------------------------------------------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _cuda_trainers(kind, aux, n=2, B=512):
    cfg = TrainConfig(kind=kind, aux=aux, n_features=2048, k=16, batch_size=B, n_tokens=B * 50, lr=1e-3,
                      dead_tokens=B * 2, rank_every=2, autocast=False)
    ts = [Trainer(cfg, 64, tempfile.mkdtemp(), device="cuda") for _ in range(n)]
    x = _data(n=B * 8, d=64).cuda()
    for t in ts:
        t.initialize(x[:B])
    return ts, x


@cuda
@pytest.mark.parametrize("kind,aux", [("topk", "aux_k"), ("feature_choice", "aux_zipf"), ("mutual_choice", "aux_k")])
@pytest.mark.parametrize("compiled", [False, True])
def test_cuda_step_never_syncs(kind, aux, compiled):
    (t,), x = _cuda_trainers(kind, aux, n=1)
    static = StaticStep(t, 512)
    if compiled:
        static.compiled()
    static.step(x[:512])  # first call: compilation and lazy CUDA initialisation may sync
    static.step(x[512:1024])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(2, 6):
            values = static.step(x[i * 512:(i + 1) * 512])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(values).all()


@cuda
@pytest.mark.parametrize("kind,aux", [("topk", "aux_k"), ("feature_choice", "aux_zipf"), ("mutual_choice", "none")])
def test_cuda_static_and_captured_steps_equal_eager(kind, aux):
    (eager, twin, cg), x = _cuda_trainers(kind, aux, n=3)
    static = StaticStep(twin, 512)
    graphed = StaticStep(cg, 512).compiled(mode="reduce-overhead")
    for i in range(6):
        xb = x[i * 512:(i + 1) * 512]
        m = eager.step(xb)
        for t, s in ((twin, static), (cg, graphed)):
            got = metrics(t, s.step(xb))
            assert got["nmse"] == pytest.approx(m["nmse"], rel=1e-4, abs=1e-6), (i, s is graphed)
    for t in (twin, cg):
        assert torch.allclose(eager.sae.W_dec, t.sae.W_dec, rtol=1e-3, atol=1e-5)


@cuda
def test_cuda_fixed_slots_equal_reference_masks():
    for name, z in _cases(256, 3000, 0):
        zc = z.cuda()
        assert torch.equal(topk_slots(zc, 16).to_mask().cpu(), topk_mask(z, 16)), name
        assert torch.equal(mutual_choice_slots(zc, 16 * 256).to_mask().cpu(), mutual_choice_mask(z, 16 * 256)), name
        sae = SAE(SAEConfig(d_in=4, n_features=3000, k=16), device="cuda")
        plan = capacity_plan(sae, 256)
        caps = sae.capacities(256)
        got = feature_choice_slots(zc, plan, sae.ranks).to_mask().cpu()
        assert torch.equal(got, feature_choice_mask(z, caps.cpu())), name


@pytest.mark.parametrize("kind,aux", [("topk", "aux_k"), ("feature_choice", "none"), ("mutual_choice", "aux_zipf")])
def test_bf16_affinities_as_under_autocast(kind, aux):
    "StaticStep(autocast=True) (the CUDA default) against the eager step under bf16 autocast, here on the CPU."
    # tied start: the tolerances below were set on it. With the least-squares start the bf16 paths drift apart
    # faster (TopK + aux_k: aux off by 1.5e-3 at step 3); the float32 comparisons above hold with the default (lstsq) start.
    eager, twin = _trainers(kind, aux, encoder_init="tied")
    eager._autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # what Trainer does on CUDA
    static = StaticStep(twin, 64, autocast=True)
    X = _data()
    for i in range(5):
        x = X[i * 64:(i + 1) * 64]
        m = eager.step(x)
        got = metrics(twin, static.step(x))
        assert got["l0"] == m["l0"], i
        assert got["nmse"] == pytest.approx(m["nmse"], rel=1e-4), i
        assert got["aux"] == pytest.approx(m["aux"], rel=1e-3, abs=1e-6), i
    assert torch.allclose(eager.sae.W_enc, twin.sae.W_enc, rtol=1e-2, atol=1e-3)  # bf16 rounding, through Adam
