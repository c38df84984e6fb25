"""Losses against naive dense versions (values and gradients), and statistics properties."""
import pytest
import torch

from mcsae.allocation import Allocation
from mcsae.losses import (FeatureStats, aux_k_loss, aux_loss_reference, aux_zipf_loss, deficit_weights, fit_zipf, nmse)
from mcsae.sae import SAE, SAEConfig, SparseCodes


def _setup(kind="topk", seed=0):
    torch.manual_seed(seed)
    sae = SAE(SAEConfig(d_in=10, n_features=40, k=3, kind=kind), dtype=torch.float64)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.2)
        sae.W_enc.add_(0.2 * torch.randn_like(sae.W_enc))
    x = torch.randn(25, 10, dtype=torch.float64)
    return sae, x, sae(x)


def test_nmse_matches_naive_and_gradient():
    x = torch.randn(30, 7, dtype=torch.float64)
    y = torch.randn(30, 7, dtype=torch.float64, requires_grad=True)
    naive = sum(((x[i] - y[i]) ** 2).sum() for i in range(30)) / sum(((x[i] - x.mean(0)) ** 2).sum() for i in range(30))
    torch.testing.assert_close(nmse(x, y), naive)
    assert torch.autograd.gradcheck(lambda y: nmse(x, y), (y,))
    with pytest.raises(ValueError):
        nmse(x, y[:, :3])


@pytest.mark.parametrize("kind", ["topk", "feature_choice", "mutual_choice"])
@pytest.mark.parametrize("seed", [0, 1])
def test_aux_zipf_loss_matches_dense_reference(kind, seed):
    sae, x, out = _setup(kind, seed)
    w = torch.rand(40, dtype=torch.float64) * (torch.rand(40) < 0.6)
    params = list(sae.parameters())
    loss = aux_zipf_loss(sae, x, out, w, k_aux=4, alpha=0.5)
    ref = aux_loss_reference(sae, x, out.x_hat, w, k_aux=4, alpha=0.5)
    torch.testing.assert_close(loss, ref)
    g = torch.autograd.grad(loss, params, allow_unused=True)
    g_ref = torch.autograd.grad(ref, params, allow_unused=True)
    for a, b in zip(g, g_ref):
        a = torch.zeros_like(b) if a is None else a
        b = torch.zeros_like(a) if b is None else b
        torch.testing.assert_close(a, b)


def test_aux_zipf_equals_aux_k_on_dead_indicator():
    sae, x, out = _setup("mutual_choice")
    dead = torch.rand(40) < 0.4
    torch.testing.assert_close(aux_zipf_loss(sae, x, out, dead.double(), 6), aux_k_loss(sae, x, out, dead, 6))


def test_aux_losses_zero_when_nothing_dead_or_underused():
    sae, x, out = _setup()
    assert aux_k_loss(sae, x, out, torch.zeros(40, dtype=torch.bool)) == 0
    assert aux_zipf_loss(sae, x, out, torch.zeros(40, dtype=torch.float64)) == 0
    p = 0.2 * torch.arange(1, 41, dtype=torch.float64) ** -1.0  # exactly on a Zipf curve
    assert deficit_weights(p).abs().max() < 1e-9


def test_aux_k_loss_gradient_only_reaches_dead_features():
    sae, x, out = _setup()
    dead = torch.zeros(40, dtype=torch.bool)
    dead[:10] = True
    aux_k_loss(sae, x, out, dead, 5).backward()
    assert sae.W_enc.grad[10:].abs().max() == 0 and sae.W_dec.grad[10:].abs().max() == 0
    assert sae.W_enc.grad[:10].abs().max() > 0


@pytest.mark.parametrize("C,s", [(0.5, 0.7), (0.02, 1.0), (1.0, 1.6)])
def test_fit_zipf_recovers_parameters(C, s):
    r = torch.arange(1, 5001, dtype=torch.float64)
    fit = fit_zipf((C * r ** -s)[torch.randperm(5000)])
    assert abs(fit.C - C) < 1e-9 * max(1, C) and abs(fit.s - s) < 1e-9 and fit.r2 > 1 - 1e-12
    with pytest.raises(ValueError):
        fit_zipf(torch.tensor([0.5, 0.0]))


def test_feature_stats_counts_tokens_and_dead_window():
    stats = FeatureStats(5, dead_tokens=8, ema_decay=0.5)
    for step in range(4):
        mask = torch.zeros(4, 5, dtype=torch.bool)
        mask[:, 0] = True
        if step == 0:
            mask[0, 3] = True
        stats.update(SparseCodes(torch.ones(int(mask.sum())), Allocation.from_mask(mask)))
    assert int(stats.n_tokens) == 16
    assert stats.tokens_since_fired.tolist() == [0, 16, 16, 12, 16]
    assert stats.dead().tolist() == [False, True, True, True, True]
    assert stats.density[0] == 1.0
    w = stats.deficit_weights()
    assert (w[stats.dead()] == 1).all()
