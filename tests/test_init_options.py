"""The least-squares encoder start (`scale_encoder`, `encoder_init`) and outlier clipping (`outlier_norm`)."""
import pytest
import torch

from mcsae.losses import nmse
from mcsae.sae import SAE, SAEConfig, encoder_gain, scale_encoder
from mcsae.train import TensorSource, TrainConfig, Trainer, train


def _heavy(n=1024, d=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) * torch.where(torch.rand(n, 1, generator=g) < 0.02, 25.0, 1.0)


@pytest.mark.parametrize("kind", ["topk", "mutual_choice", "feature_choice"])
def test_gain_is_the_least_squares_optimum_and_keeps_the_allocation(kind):
    torch.manual_seed(0)
    x = _heavy()
    sae = SAE(SAEConfig(d_in=24, n_features=192, k=6, kind=kind), dtype=torch.float64).eval()
    with torch.no_grad():
        sae.b_dec.normal_(0, 0.1)
        sae.b_enc.normal_(0, 0.05)  # the gain keeps the allocation with a non-zero b_enc too
    x = x.double()
    before = sae(x)
    x_hat0 = before.x_hat - sae.b_dec  # bias-free reconstruction
    # closed form against a brute-force scan of g
    grid = torch.linspace(0.01, 2.0, 400, dtype=torch.float64)
    errs = torch.stack([(x - sae.b_dec - g * x_hat0).pow(2).sum() for g in grid])
    g = scale_encoder(sae, x)
    assert abs(g - grid[errs.argmin()].item()) < 2 * (grid[1] - grid[0]).item()
    after = sae(x)
    assert torch.equal(before.codes.alloc.token, after.codes.alloc.token)
    assert torch.equal(before.codes.alloc.feature, after.codes.alloc.feature)
    torch.testing.assert_close(after.codes.values, g * before.codes.values)
    assert abs(encoder_gain(sae, x) - 1.0) < 1e-9  # already optimal: a second gain is 1


def test_gain_leaves_weights_alone_when_nothing_is_selected():
    sae = SAE(SAEConfig(d_in=8, n_features=32, k=2, kind="mutual_choice"))
    with torch.no_grad():
        sae.b_enc.fill_(-1e6)  # every affinity is zero: no pair selected
    w = sae.W_enc.clone()
    assert scale_encoder(sae, torch.randn(16, 8)) == 1.0 and torch.equal(sae.W_enc, w)


@pytest.mark.parametrize("kind", ["mutual_choice", "feature_choice"])
def test_lstsq_start_brings_the_initial_nmse_below_one(kind):
    x = _heavy()
    res = {}
    for init in ("tied", "lstsq"):
        t = Trainer(TrainConfig(kind=kind, n_features=256, k=6, n_tokens=1024, batch_size=1024, encoder_init=init), 24, "/tmp/x")
        t.initialize(x)
        with torch.no_grad():
            res[init] = nmse(x * t.scale, t.sae.eval()(x * t.scale).x_hat).item()
    assert res["tied"] > 2 and res["lstsq"] < 1, res


def test_tied_is_the_old_start():
    t = Trainer(TrainConfig(n_features=64, k=4, n_tokens=256, batch_size=256, encoder_init="tied"), 24, "/tmp/x")
    t.initialize(_heavy(256))
    assert torch.equal(t.sae.W_enc, t.sae.W_dec) and t.sae.b_enc.abs().max() == 0


@pytest.mark.parametrize("action", ["clip", "drop"])
def test_outlier_limit_in_training_and_resume(tmp_path, action):
    x = _heavy(4096)
    cfg = TrainConfig(kind="mutual_choice", n_features=96, k=4, n_tokens=256 * 12, batch_size=256, warmup_steps=2,
                      checkpoint_every=4, outlier_norm=3.0, outlier_action=action, encoder_init="lstsq")
    t = Trainer(cfg, 24, tmp_path / "t")
    t.initialize(x[:256])
    xs = x * t.scale
    limited = t.limit_norms(xs)
    if action == "clip":
        assert limited.shape == xs.shape and limited.norm(dim=1).max() <= t.max_norm * (1 + 1e-5)
    else:
        assert len(limited) < len(xs) and limited.norm(dim=1).max() <= t.max_norm
    full = SAE.load(train(cfg, TensorSource(x), tmp_path / "full", progress=False)[0])
    train(cfg, TensorSource(x), tmp_path / "cut", progress=False, stop_after=5)
    resumed = SAE.load(train(cfg, TensorSource(x), tmp_path / "cut", resume=True, progress=False)[0])
    for (n, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("bad", [dict(encoder_init="orthogonal"), dict(outlier_norm=0.5), dict(outlier_norm=-1.0),
                                 dict(outlier_action="normalize")])
def test_bad_options_are_refused(bad):
    with pytest.raises(ValueError, match="TrainConfig"):
        TrainConfig(**bad)


def test_static_step_refuses_the_outlier_limit():
    from mcsae.static import StaticStep

    t = Trainer(TrainConfig(n_features=64, k=4, n_tokens=256, batch_size=256, outlier_norm=3.0), 24, "/tmp/x")
    with pytest.raises(ValueError, match="outlier_norm"):
        StaticStep(t, 256)
