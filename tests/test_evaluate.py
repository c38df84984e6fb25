"""Every evaluation metric on cases with known answers."""
import math

import pytest
import torch

from mcsae.evaluate import adaptive_computation, downstream_losses, reconstruction_metrics, spearman
from mcsae.sae import SAE, SAEConfig
from tiny import tiny_model


class Fixed(SAE):
    "An SAE whose reconstruction is given by a function of its input (for known answers)."

    def __init__(self, cfg, fn):
        super().__init__(cfg)
        self.fn = fn

    def forward(self, x, mode="batch"):
        out = super().forward(x, mode="batch")
        return out._replace(x_hat=self.fn(x))


def _cfg(d, k=2):
    return SAEConfig(d_in=d, n_features=4 * d, k=k)


def test_nmse_known_answers():
    x = torch.randn(300, 6)
    perfect = reconstruction_metrics(Fixed(_cfg(6), lambda x: x), [x[:100], x[100:200], x[200:]])
    assert perfect["nmse"] == pytest.approx(0, abs=1e-9) and perfect["explained_variance"] == pytest.approx(1)
    mean = x.mean(0)
    m = reconstruction_metrics(Fixed(_cfg(6), lambda b: mean.expand_as(b)), [x[:150], x[150:]])
    assert m["nmse"] == pytest.approx(1.0, rel=1e-5)  # the pooled mean predictor explains nothing
    half = reconstruction_metrics(Fixed(_cfg(6), lambda b: mean + 0.5 * (b - mean)), [x])
    assert half["nmse"] == pytest.approx(0.25, rel=1e-5)
    assert half["mse"] == pytest.approx(((x - mean) * 0.5).pow(2).sum(1).mean().item(), rel=1e-5)


def test_l0_and_dead_known_answers():
    sae = SAE(SAEConfig(d_in=4, n_features=8, k=1))
    with torch.no_grad():
        sae.W_dec.copy_(torch.cat([torch.eye(4), -torch.eye(4)]))
        sae.W_enc.copy_(sae.W_dec)
    x = torch.cat([torch.eye(4)[:3] * 2, -torch.eye(4)[:3]])  # features 3 and 7 never fire
    m = reconstruction_metrics(sae, [x])
    assert m["l0_mean"] == 1 and m["l0_hist"] == [0, 6] and m["dead_frac_eval"] == pytest.approx(2 / 8)
    assert m["density"] == pytest.approx([1 / 6, 1 / 6, 1 / 6, 0, 1 / 6, 1 / 6, 1 / 6, 0])
    with pytest.raises(ValueError, match="no held-out"):
        reconstruction_metrics(sae, [])


def test_spearman_known_answers():
    a = torch.tensor([1.0, 2, 3, 4, 5])
    assert spearman(a, a.exp()) == pytest.approx(1)
    assert spearman(a, -a) == pytest.approx(-1)
    assert spearman(torch.tensor([1.0, 2, 3, 4]), torch.tensor([2.0, 1, 4, 3])) == pytest.approx(0.6)


def test_adaptive_computation_detects_harder_tokens():
    torch.manual_seed(0)
    x = torch.randn(400, 8)
    ref = Fixed(_cfg(8), lambda b: 0.0 * b)  # error = ||x||^2: difficulty is the norm

    class NormL0(SAE):
        "More features for larger tokens."
        def forward(self, x, mode="batch"):
            from mcsae.allocation import Allocation
            n = (x.norm(dim=1) * 3).long().clamp(1, self.cfg.n_features)  # [B]
            mask = torch.arange(self.cfg.n_features)[None, :] < n[:, None]
            out = super().forward(x, mode="batch")
            from mcsae.sae import SparseCodes
            alloc = Allocation.from_mask(mask)
            return out._replace(codes=SparseCodes(torch.ones(int(mask.sum())), alloc))

    res = adaptive_computation(NormL0(_cfg(8)), ref, [x[:200], x[200:]], n_bins=4)
    assert res["spearman"] > 0.95
    assert res["l0_per_bin"] == sorted(res["l0_per_bin"])


def test_downstream_identity_and_zero_known_answers():
    model, _ = tiny_model()
    ids = torch.randint(0, 60, (5, 20))
    keep = torch.ones_like(ids, dtype=torch.bool)
    keep[:, 0] = False
    d = model.config.n_embd
    saes = {"identity": (Fixed(_cfg(d), lambda x: x), "batch"), "zero": (Fixed(_cfg(d), lambda x: 0 * x), "batch")}
    res = downstream_losses(model, ids, 1, saes, keep=keep, batch_size=2)
    assert res["tokens"] == 5 * 18  # predictions made at positions 1..18 (0 is not replaced, 19 predicts nothing)
    ident, zero = res["saes"]["identity"], res["saes"]["zero"]
    assert ident["ce"] == pytest.approx(res["ce_clean"], abs=1e-5) and ident["kl"] == pytest.approx(0, abs=1e-6)
    assert zero["ce"] == pytest.approx(res["ce_zero"], abs=1e-5) and zero["loss_recovered"] == pytest.approx(0, abs=1e-3)
    assert ident["loss_recovered"] == pytest.approx(1, abs=1e-3)
    assert zero["kl"] > 0 and math.isfinite(zero["kl"])
