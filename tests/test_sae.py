"""Equivalence of the SAE's sparse fast path against the dense reference, and checkpoint robustness."""
import pytest
import torch

from mcsae.sae import KINDS, SAE, SAEConfig, dense_reference


def _sae(kind, F=96, d=20, k=5, dtype=torch.float64, seed=0, **kw):
    torch.manual_seed(seed)
    sae = SAE(SAEConfig(d_in=d, n_features=F, k=k, kind=kind, **kw), dtype=dtype)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.2)
        sae.b_dec.normal_(0, 0.5)
        sae.W_enc.add_(0.3 * torch.randn_like(sae.W_enc))  # untie
    return sae


@pytest.mark.parametrize("kind,caps", [("topk", "zipf"), ("feature_choice", "zipf"), ("feature_choice", "uniform"),
                                       ("mutual_choice", "zipf")])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sparse_path_matches_dense_reference(kind, caps, seed):
    sae = _sae(kind, capacities=caps, seed=seed)
    x = torch.randn(37, 20, dtype=torch.float64)
    target = torch.randn(37, 20, dtype=torch.float64)
    out = sae(x)
    loss = ((out.x_hat - target) ** 2).sum()
    params = list(sae.parameters())
    grads = torch.autograd.grad(loss, params)
    ref = dense_reference(sae, x, out.codes.alloc.to_mask())
    grads_ref = torch.autograd.grad(((ref - target) ** 2).sum(), params)
    torch.testing.assert_close(out.x_hat, ref)
    for (name, _), g, gr in zip(sae.named_parameters(), grads, grads_ref):
        torch.testing.assert_close(g, gr, msg=name)
    torch.testing.assert_close(out.codes.to_dense(), torch.relu((x - sae.b_dec) @ sae.W_enc.T + sae.b_enc) * out.codes.alloc.to_mask())


@pytest.mark.parametrize("max_bag", [1, 3, 64])
def test_split_feature_bags_equal_whole_bags(max_bag):
    "The GPU's split per-feature sums (long bags cut into pieces) equal one bag per feature."
    from mcsae.allocation import feature_choice_allocation, zipf_capacities
    from mcsae.sae import feature_sums, by_feature
    gen = torch.Generator().manual_seed(max_bag)
    z = torch.randn(200, 50, generator=gen).relu()
    alloc = feature_choice_allocation(z, zipf_capacities(50, 600, s=1.2, max_per_feature=200))  # skewed: long bags
    order = by_feature(alloc)
    table, w = torch.randn(200, 7, dtype=torch.float64, generator=gen), torch.randn(alloc.feature.numel(), dtype=torch.float64, generator=gen)
    whole = feature_sums(order, table, w, max_bag=0)
    torch.testing.assert_close(feature_sums(order, table, w, max_bag=max_bag), whole)
    dense = torch.zeros(50, 7, dtype=torch.float64).index_add_(0, alloc.feature[order.perm], w.unsqueeze(1) * table[order.token])
    torch.testing.assert_close(whole, dense)


def test_input_gradient_matches_reference():
    sae = _sae("mutual_choice")
    x = torch.randn(16, 20, dtype=torch.float64, requires_grad=True)
    out = sae(x)
    (g,) = torch.autograd.grad(out.x_hat.pow(2).sum(), x)
    x2 = x.detach().clone().requires_grad_(True)
    (g_ref,) = torch.autograd.grad(dense_reference(sae, x2, out.codes.alloc.to_mask()).pow(2).sum(), x2)
    torch.testing.assert_close(g, g_ref)


@pytest.mark.parametrize("kind", KINDS)
def test_budgets(kind):
    sae = _sae(kind, dtype=torch.float32, F=200, k=7)
    x = torch.randn(64, 20)
    l0 = sae(x).codes.l0()
    if kind == "topk":
        assert (l0 <= 7).all() and l0.sum() > 0
    else:
        assert l0.sum() <= 7 * 64
    if kind == "feature_choice":
        per_feature = torch.bincount(sae(x).codes.alloc.feature, minlength=200)
        assert (per_feature <= sae.capacities(64)).all()


def test_threshold_mode_is_per_token_and_deterministic():
    sae = _sae("feature_choice", dtype=torch.float32)
    for _ in range(5):
        sae(torch.randn(128, 20))
    sae.eval()
    x = torch.randn(50, 20)
    whole = sae(x, mode="threshold").codes.alloc.to_mask()
    parts = torch.cat([sae(x[i:i + 7], mode="threshold").codes.alloc.to_mask() for i in range(0, 50, 7)])
    assert torch.equal(whole, parts)


@pytest.mark.parametrize("kind", KINDS)
def test_training_forward_under_bf16_autocast(kind):
    "Under autocast the affinities are bf16; selection and the fp32 statistics still work (CPU autocast here)."
    sae = _sae(kind, dtype=torch.float32, F=200, k=7)
    x = torch.randn(64, 20)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for _ in range(3):
            out = sae(x)
    assert out.affinities.dtype == torch.bfloat16 and out.x_hat.dtype == torch.float32
    assert sae.thresholds.dtype == torch.float32 and torch.isfinite(sae.thresholds).all() and int(sae.step) == 3
    out.x_hat.sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in sae.parameters())


@pytest.mark.parametrize("bad", [dict(k=96), dict(k=200), dict(k=0), dict(kind="nope"), dict(kind="fc"), dict(kind="batchtopk"),
                                 dict(capacities="exp")])
def test_bad_config(bad):
    with pytest.raises(ValueError):
        SAEConfig(**{**dict(d_in=20, n_features=96, k=5), **bad})


def test_bad_inputs():
    sae = _sae("topk", dtype=torch.float32)
    for x in [torch.randn(4, 19), torch.randn(20), torch.randn(0, 20), torch.tensor([[float("inf")] * 20])]:
        with pytest.raises(ValueError):
            sae(x)
    with pytest.raises(ValueError, match="mode"):
        sae(torch.randn(4, 20), mode="fast")


def test_checkpoint_roundtrip_and_errors(tmp_path):
    sae = _sae("mutual_choice", dtype=torch.float32)
    sae(torch.randn(64, 20))
    path = sae.save(tmp_path / "a.safetensors")
    back = SAE.load(path)
    for (n, a), b in zip(sae.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), n
    # truncated file
    data = path.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a valid"):
        SAE.load(tmp_path / "trunc.safetensors")
    # a safetensors file that is not an mcsae checkpoint
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(3)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not an mcsae"):
        SAE.load(tmp_path / "other.safetensors")
    # shapes that do not match the stored config
    import json
    from mcsae.sae import CHECKPOINT_FORMAT
    from dataclasses import asdict
    tensors = {k: v.clone() for k, v in sae.state_dict().items()}
    tensors["W_dec"] = tensors["W_dec"][:, :10].contiguous()
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata={"format": CHECKPOINT_FORMAT, "config": json.dumps(asdict(sae.cfg))})
    with pytest.raises(ValueError, match="W_dec"):
        SAE.load(tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="no checkpoint"):
        SAE.load(tmp_path / "missing.safetensors")


def test_save_does_not_clobber_on_failure(tmp_path, monkeypatch):
    sae = _sae("topk", dtype=torch.float32)
    path = sae.save(tmp_path / "sae.safetensors")
    before = path.read_bytes()
    import mcsae.sae as m

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(m, "save_file", boom)
    with pytest.raises(OSError):
        sae.save(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae.safetensors"]


@pytest.mark.parametrize("kind", KINDS)
def test_training_step_saves_no_dense_batch_by_features_tensor(kind):
    "After the encoder matmul nothing of size B x F is kept for the backward pass."
    B, F_, d = 64, 512, 20
    sae = _sae(kind, F=F_, d=d, k=4, dtype=torch.float32)
    x = torch.randn(B, d)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        out = sae(x)
        loss = ((out.x_hat - x) ** 2).sum()
    loss.backward()
    assert saved and max(saved) < B * F_, saved
    assert all(p.grad is not None for p in sae.parameters())


def test_by_feature_and_decode_without_order():
    from mcsae.sae import SparseCodes, by_feature
    sae = _sae("mutual_choice")
    x = torch.randn(30, 20, dtype=torch.float64)
    out = sae(x)
    a, o = out.codes.alloc, out.codes.order
    assert torch.equal(o.perm, torch.argsort(a.feature, stable=True))
    assert torch.equal(o.token, a.token[o.perm])
    assert torch.equal(o.offsets.diff(), torch.bincount(a.feature, minlength=a.n_features))
    assert torch.equal(by_feature(a).perm, o.perm)
    # decoding codes that carry no order (e.g. the aux losses' codes) sorts on demand, same result
    again = sae.decode(SparseCodes(out.codes.values, a))
    torch.testing.assert_close(again, out.x_hat)


@pytest.mark.parametrize("kind", KINDS)
def test_empty_allocation_backward(kind):
    "A batch with no positive affinity selects nothing; the step still runs and gradients are zero where expected."
    sae = _sae(kind, dtype=torch.float32)
    with torch.no_grad():
        sae.b_enc.fill_(-1e4)  # every pre-activation negative
    x = torch.randn(8, 20)
    out = sae(x)
    assert out.codes.alloc.feature.numel() == 0
    ((out.x_hat - x) ** 2).sum().backward()
    assert sae.W_enc.grad.abs().sum() == 0 and sae.W_dec.grad.abs().sum() == 0
    torch.testing.assert_close(sae.b_dec.grad, 2 * (sae.b_dec - x).sum(0).detach())


def test_remove_parallel_grads_matches_projection():
    sae = _sae("topk")
    sae.W_dec.grad = torch.randn_like(sae.W_dec)
    g, w = sae.W_dec.grad.clone(), sae.W_dec.detach()
    sae.remove_parallel_grads()
    torch.testing.assert_close(sae.W_dec.grad, g - (g * w).sum(1, keepdim=True) * w)


def test_check_input_catches_nan_and_inf_anywhere():
    sae = _sae("topk", dtype=torch.float32)
    for bad in [float("nan"), float("inf"), -float("inf")]:
        x = torch.randn(16, 20)
        x[7, 3] = bad
        with pytest.raises(ValueError, match="NaN or inf"):
            sae(x)
    big = torch.full((16, 20), 3e38)  # finite, but its float32 sum would overflow
    sae.check_input(big)


def test_variant_ids_and_labels():
    from mcsae.sae import VARIANTS, variant_id
    assert list(VARIANTS) == ["topk", "feature_choice-zipf", "feature_choice-uniform", "mutual_choice"]
    assert [label for _, label in VARIANTS.values()] == ["TopK", "FC (Zipf)", "FC (uniform)", "MC"]
    for vid, (fields, _) in VARIANTS.items():
        assert variant_id(SAEConfig(d_in=8, n_features=32, k=4, **fields)) == vid
    with pytest.raises(ValueError, match="use 'mutual_choice'"):
        SAEConfig(d_in=8, n_features=32, k=4, kind="mc")


def test_pair_dots_private_op_equals_public_reference():
    "The fast path (private aten op) and the public fallback give the same dot products, also in float64 and bf16."
    from mcsae.allocation import allocate
    from mcsae.sae import private_pair_dots, pair_dots, pair_dots_reference, private_op_works
    assert private_op_works(), "the private op is missing or changed on this torch: the fallback is in use"
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        z = torch.randn(64, 96, generator=gen).relu()
        for kind in ("topk", "mutual_choice", "feature_choice"):
            alloc = allocate(z, kind, k=6)
            g, w = torch.randn(64, 24, generator=gen, dtype=dtype), torch.randn(96, 24, generator=gen, dtype=dtype)
            torch.testing.assert_close(private_pair_dots(g, w, alloc), pair_dots_reference(g, w, alloc))
            torch.testing.assert_close(pair_dots_reference(g, w, alloc, chunk=5), pair_dots_reference(g, w, alloc))
            torch.testing.assert_close(pair_dots(g, w, alloc), pair_dots_reference(g, w, alloc))


@pytest.mark.parametrize("kind", KINDS)
def test_fallback_is_chosen_when_the_private_op_is_missing_and_gives_the_same_gradients(kind, monkeypatch):
    import mcsae.sae as m
    x = torch.randn(48, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def grads():
        torch.manual_seed(0)
        sae = _sae(kind)
        out = sae(x)
        loss = (out.x_hat - x).pow(2).sum()
        return [g.clone() for g in torch.autograd.grad(loss, list(sae.parameters()))]

    fast = grads()
    m.private_op_works.cache_clear()
    monkeypatch.setattr(m, "PRIVATE_OP", "no_such_op_in_this_torch")
    try:
        assert not m.private_op_works()
        slow = grads()
    finally:
        m.private_op_works.cache_clear()
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b)


def test_fallback_is_chosen_when_the_private_op_changes_signature(monkeypatch):
    import mcsae.sae as m

    def changed(*args):
        raise RuntimeError("aten::_embedding_bag_per_sample_weights_backward() Expected at most 6 argument(s) but received 7")

    m.private_op_works.cache_clear()
    monkeypatch.setattr(m.torch.ops.aten, m.PRIVATE_OP, changed, raising=False)
    try:
        assert not m.private_op_works()
    finally:
        monkeypatch.undo()
        m.private_op_works.cache_clear()
    assert m.private_op_works()
