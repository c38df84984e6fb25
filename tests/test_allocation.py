"Equivalence and property tests for mcsae.allocation (brute force ⇔ reference masks ⇔ fast allocations)."
import math
import random

import pytest
import torch

from mcsae.allocation import (
    Allocation, allocate, feature_choice_allocation, feature_choice_mask, mutual_choice_allocation,
    mutual_choice_mask, topk_allocation, topk_mask, uniform_capacities, zipf_capacities,
)


# ---------------------------------------------------------------- brute force (pure Python)
def bf_topk(z, k):
    B, F = len(z), len(z[0])
    out = [[False] * F for _ in range(B)]
    for t in range(B):
        for v, f in sorted((-z[t][f], f) for f in range(F))[:k]:
            out[t][f] = -v > 0
    return out


def bf_feature_choice(z, caps):
    B, F = len(z), len(z[0])
    out = [[False] * F for _ in range(B)]
    for f in range(F):
        for v, t in sorted((-z[t][f], t) for t in range(B))[: caps[f]]:
            out[t][f] = -v > 0
    return out


def bf_mutual_choice(z, budget):
    B, F = len(z), len(z[0])
    out = [[False] * F for _ in range(B)]
    for v, i in sorted((-z[i // F][i % F], i) for i in range(B * F))[:budget]:
        out[i // F][i % F] = -v > 0
    return out


def batchtopk_reference(z, budget):
    "BatchTopK as usually written: flatten, stable sort, keep the first K positive."
    flat = z.flatten()
    order = torch.sort(flat, descending=True, stable=True).indices[:budget]
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[order] = flat[order] > 0
    return mask.view_as(z)


def same(alloc: Allocation, mask: torch.Tensor) -> bool:
    ref = Allocation.from_mask(mask)
    return (all(torch.equal(a, b) for a, b in zip(alloc[:3], ref[:3])) and alloc.n_features == ref.n_features
            and alloc.token.dtype == torch.long and alloc.feature.dtype == torch.long)


def random_z(gen, B, F, kind):
    if kind == "int":  # heavy ties, ~half zeros
        return torch.randint(-4, 4, (B, F), generator=gen).clamp(min=0).float()
    if kind == "zeros":
        return torch.zeros(B, F)
    return torch.relu(torch.randn(B, F, generator=gen) - 0.2)


def random_cases(n, seed=0):
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    for i in range(n):
        B, F = rng.randint(1, 9), rng.randint(1, 13)
        yield rng, random_z(gen, B, F, ["int", "int", "cont", "zeros"][i % 4])


# ---------------------------------------------------------------- capacities
@pytest.mark.parametrize("F,K", [(1, 0), (1, 7), (5, 12), (7, 3), (8, 64), (6144, 131072)])
def test_uniform_capacities(F, K):
    caps = uniform_capacities(F, K)
    assert caps.dtype == torch.long and caps.shape == (F,) and caps.sum() == K
    assert caps.max() - caps.min() <= 1 and torch.all(caps[:-1] >= caps[1:])


def test_zipf_capacities_properties():
    rng = random.Random(1)
    for _ in range(300):
        F, B = rng.randint(1, 40), rng.randint(1, 30)
        K = rng.randint(0, F * B)
        s = rng.choice([0.0, 0.5, 1.0, 1.5, 3.0])
        ranks = torch.randperm(F, generator=torch.Generator().manual_seed(rng.randint(0, 99))) + 1
        caps = zipf_capacities(F, K, s=s, max_per_feature=B, ranks=ranks)
        assert caps.dtype == torch.long and caps.sum() == K and caps.min() >= 0 and caps.max() <= B
        by_rank = caps[ranks.argsort()]  # capacities in rank order are non-increasing
        assert torch.all(by_rank[:-1] >= by_rank[1:])
        # unclipped capacities are within 1 of the real share of the water-filled remainder
        free = caps < B
        if free.any() and not free.all():
            w = ranks[free].double() ** -s
            share = (K - B * int((~free).sum())) * w / w.sum()
            assert torch.all((caps[free] - share).abs() < 1 + 1e-9)


def test_zipf_capacities_values():
    assert zipf_capacities(8, 12).tolist() == [4, 2, 1, 1, 1, 1, 1, 1]
    assert zipf_capacities(4, 10, s=0.0).tolist() == [3, 3, 2, 2]  # remainder ties: lower rank first
    assert zipf_capacities(3, 9, max_per_feature=3).tolist() == [3, 3, 3]  # K = F·max fills everything
    big = zipf_capacities(6144, 32 * 4096, max_per_feature=4096)
    assert big.sum() == 32 * 4096 and big.max() == 4096 and big.min() >= 1
    ranks = torch.tensor([3, 1, 2])
    assert zipf_capacities(3, 11, ranks=ranks).tolist() == zipf_capacities(3, 11)[ranks - 1].tolist()


@pytest.mark.parametrize("kwargs,match", [
    (dict(n_features=4, budget=13, max_per_feature=3), "exceeds"),
    (dict(n_features=4, budget=-1), "budget"),
    (dict(n_features=4, budget=4, s=-0.5), "exponent"),
    (dict(n_features=0, budget=0), "n_features"),
    (dict(n_features=3, budget=3, ranks=torch.tensor([1, 2, 2])), "permutation"),
    (dict(n_features=3, budget=3, ranks=torch.tensor([0, 1, 2])), "permutation"),
    (dict(n_features=3, budget=3, ranks=torch.tensor([1, 2])), "shape"),
])
def test_zipf_capacities_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        zipf_capacities(**kwargs)


# ---------------------------------------------------------------- reference masks == brute force, fast == reference
def test_topk_small():
    for rng, z in random_cases(100, seed=1):
        B, F = z.shape
        for k in {0, F, rng.randint(0, F)}:
            ref = topk_mask(z, k)
            assert ref.tolist() == bf_topk(z.tolist(), k)
            assert same(topk_allocation(z, k), ref) and same(allocate(z, "topk", k=k), ref)


def test_feature_choice_small():
    for rng, z in random_cases(100, seed=2):
        B, F = z.shape
        K = rng.randint(0, B * F)
        ranks = torch.randperm(F, generator=torch.Generator().manual_seed(rng.randint(0, 99))) + 1
        for caps in [uniform_capacities(F, K),
                     zipf_capacities(F, K, s=rng.choice([0.5, 1.0, 2.0]), max_per_feature=B, ranks=ranks),
                     torch.tensor([rng.randint(0, B) for _ in range(F)])]:
            if caps.max() > B:
                continue
            ref = feature_choice_mask(z, caps)
            assert ref.tolist() == bf_feature_choice(z.tolist(), caps.tolist())
            assert same(feature_choice_allocation(z, caps), ref)
            assert same(allocate(z, "feature_choice", capacities=caps), ref)


def test_mutual_choice_small():
    for rng, z in random_cases(100, seed=3):
        B, F = z.shape
        for K in {0, B * F, rng.randint(0, B * F)}:
            ref = mutual_choice_mask(z, K)
            assert ref.tolist() == bf_mutual_choice(z.tolist(), K)
            assert torch.equal(ref, batchtopk_reference(z, K))
            assert same(mutual_choice_allocation(z, K), ref)
            assert same(allocate(z, "mutual_choice", budget=K), ref)


@pytest.mark.parametrize("B,F,kind", [(256, 512, "cont"), (300, 96, "int"), (768, 64, "int"), (257, 128, "cont"), (64, 33, "zeros")])
def test_medium_fast_equals_reference(B, F, kind):
    "Sizes where the sampling, blocking and grouping paths are active (incl. B, F with awkward divisors)."
    gen = torch.Generator().manual_seed(B + F)
    z = random_z(gen, B, F, kind)
    for k in (1, 8, F // 3):
        assert same(topk_allocation(z, k), topk_mask(z, k))
        assert same(allocate(z, "mutual_choice", k=k), batchtopk_reference(z, k * B))
        for caps in (uniform_capacities(F, k * B), zipf_capacities(F, k * B, max_per_feature=B),
                     zipf_capacities(F, k * B, s=0.5, max_per_feature=B, ranks=torch.randperm(F, generator=gen) + 1)):
            assert same(feature_choice_allocation(z, caps), feature_choice_mask(z, caps))
    assert same(allocate(z, "feature_choice", k=4), feature_choice_mask(z, uniform_capacities(F, 4 * B)))


def test_mutual_choice_threshold_fallback():
    "A sample that overestimates the threshold (sampled entries large, the rest smaller) still gives the exact result."
    B, F = 64, 8192
    z = torch.full((B * F,), 0.5)
    from mcsae.allocation import sample_stride
    z[:: sample_stride(B * F, F)] = 1.0
    z = z.view(B, F)
    K = B * F // 2
    assert same(mutual_choice_allocation(z, K), batchtopk_reference(z, K))


def test_allocation_roundtrip_and_decode():
    gen = torch.Generator().manual_seed(5)
    z = random_z(gen, 20, 30, "cont")
    a = mutual_choice_allocation(z, 60)
    mask = a.to_mask()
    assert a.n_tokens == 20 and torch.equal(a.counts(), mask.sum(1)) and int(a.counts().sum()) == 60
    assert same(Allocation.from_mask(mask), mask)
    assert torch.all(a.token[1:] >= a.token[:-1])
    W = torch.randn(30, 7, generator=gen)
    x_hat = torch.nn.functional.embedding_bag(a.feature, W, a.offsets, per_sample_weights=z[a.token, a.feature],
                                              mode="sum", include_last_offset=True)
    assert torch.allclose(x_hat, (z * mask) @ W, atol=1e-5)


def test_dtypes_and_no_grad():
    gen = torch.Generator().manual_seed(6)
    z = random_z(gen, 64, 96, "int").requires_grad_()
    caps = zipf_capacities(96, 512, max_per_feature=64)
    for dtype in (torch.float64, torch.bfloat16, torch.float16):
        zd = z.detach().to(dtype)
        assert same(topk_allocation(zd, 8), topk_mask(zd, 8))
        assert same(mutual_choice_allocation(zd, 512), mutual_choice_mask(zd, 512))
        assert same(feature_choice_allocation(zd, caps), feature_choice_mask(zd, caps))
    assert same(topk_allocation(z, 8), topk_mask(z.detach(), 8))  # works on a tensor that requires grad


def test_bf16_affinities_with_many_ties():
    "Mixed precision gives bf16 affinities, where ties across the cut are the rule: still exactly the reference."
    gen = torch.Generator().manual_seed(7)
    z = torch.randn(512, 3000, generator=gen).relu().bfloat16()
    vals = torch.topk(z.float(), 17, dim=1).values
    assert (vals[:, 15] == vals[:, 16]).float().mean() > 0.2  # many rows are tied at the boundary
    caps = zipf_capacities(3000, 16 * 512, s=0.8, max_per_feature=512)
    assert same(topk_allocation(z, 16), topk_mask(z, 16))
    assert same(mutual_choice_allocation(z, 16 * 512), mutual_choice_mask(z, 16 * 512))
    assert same(feature_choice_allocation(z, caps), feature_choice_mask(z, caps))


@pytest.mark.parametrize("levels", [2, 50, 200])
def test_topk_ties_within_and_beyond_the_second_topk(levels):
    "Boundary ties resolved from the 2k+1 largest (few equal values) or the whole row in chunks (many): both exact."
    from mcsae.allocation import break_ties
    gen = torch.Generator().manual_seed(levels)
    z = (torch.rand(120, 900, generator=gen) * levels).floor() / levels  # [120, 900], heavy ties
    for k in (1, 7, 33):
        ref = topk_mask(z, k)
        assert same(topk_allocation(z, k), ref)
        vals = torch.topk(z, k + 1, dim=1).values
        rows = ((vals[:, k] == vals[:, k - 1]) & (vals[:, k - 1] > 0)).nonzero().flatten()
        picks = break_ties(z, rows, k, chunk=2000)  # tiny chunks: the whole-row search runs several times
        mask = torch.zeros_like(ref)
        mask[rows.unsqueeze(1), picks] = True
        assert torch.equal(mask[rows], ref[rows])


# ---------------------------------------------------------------- errors
def test_errors():
    z = torch.rand(4, 6)
    nan, inf = z.clone(), z.clone()
    nan[1, 2], inf[2, 3] = float("nan"), float("inf")
    caps = uniform_capacities(6, 8)
    calls = [
        (lambda v: topk_mask(v, 2), lambda v: topk_allocation(v, 2)),
        (lambda v: feature_choice_mask(v, caps), lambda v: feature_choice_allocation(v, caps)),
        (lambda v: mutual_choice_mask(v, 8), lambda v: mutual_choice_allocation(v, 8)),
    ]
    for ref, fast in calls:
        for f in (ref, fast):
            for bad in (nan, inf):
                with pytest.raises(ValueError, match="non-finite"):
                    f(bad)
            for bad in (torch.rand(6), torch.rand(2, 3, 4)):
                with pytest.raises(ValueError, match="2-D"):
                    f(bad)
    neg_inf = z.clone(); neg_inf[0, 0] = -math.inf
    with pytest.raises(ValueError, match="non-finite"):
        topk_mask(neg_inf, 2)
    for f in (topk_mask, topk_allocation):
        for k in (-1, 7):
            with pytest.raises(ValueError, match="k must be"):
                f(z, k)
    for f in (mutual_choice_mask, mutual_choice_allocation):
        for K in (-1, 25):
            with pytest.raises(ValueError, match="budget"):
                f(z, K)
    for f in (feature_choice_mask, feature_choice_allocation):
        for bad, match in [(torch.ones(5, dtype=torch.long), "shape"), (torch.tensor([1, 1, 1, 1, 1, -1]), ">= 0"),
                           (torch.tensor([5, 0, 0, 0, 0, 0]), "<= the number of tokens"), (torch.ones(6), "integer")]:
            with pytest.raises(ValueError, match=match):
                f(z, bad)
    with pytest.raises(ValueError, match="unknown allocation kind"):
        allocate(z, "bogus", k=2)
    with pytest.raises(ValueError, match="needs"):
        allocate(z, "topk")
    with pytest.raises(ValueError, match="needs"):
        allocate(z, "mutual_choice")


@pytest.mark.parametrize("old, new", [("batchtopk", "mutual_choice"), ("mc", "mutual_choice"), ("fc", "feature_choice"), ("tk", "topk")])
def test_old_kind_names_get_an_error_naming_the_new_one(old, new):
    with pytest.raises(ValueError, match=f"use '{new}'"):
        allocate(torch.rand(4, 6), old, k=2)
