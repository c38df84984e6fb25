"""End-to-end training: resume equals uninterrupted, sweep on one stream, CLI on a tiny cache, errors."""
import json


import pytest
import torch

from mcsae.sae import SAE
from mcsae.train import TensorSource, TrainConfig, Trainer, read_metrics, train


def _data(n=6000, d=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    dirs = torch.nn.functional.normalize(torch.randn(96, d, generator=g), dim=1)
    idx = torch.multinomial((1.0 / torch.arange(1, 97)).expand(n, -1), 3, generator=g)
    return 2 * torch.einsum("np,npd->nd", torch.rand(n, 3, generator=g) + 0.5, dirs[idx])


BASE = dict(n_features=128, k=4, n_tokens=256 * 40, batch_size=256, warmup_steps=5, log_every=5, checkpoint_every=10,
            dead_tokens=256 * 10, lr=3e-3)


@pytest.mark.parametrize("kind,aux", [("topk", "aux_k"), ("feature_choice", "aux_zipf"), ("mutual_choice", "none")])
def test_resume_equals_uninterrupted(tmp_path, kind, aux):
    src = TensorSource(_data())
    cfg = TrainConfig(kind=kind, aux=aux, **BASE)
    full = SAE.load(train(cfg, src, tmp_path / "full", progress=False)[0])
    train(cfg, src, tmp_path / "cut", progress=False, stop_after=17)
    resumed = SAE.load(train(cfg, src, tmp_path / "cut", resume=True, progress=False)[0])
    for (n, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), n
    m_full = read_metrics(tmp_path / "full" / cfg.name)
    m_cut = read_metrics(tmp_path / "cut" / cfg.name)
    assert [m["step"] for m in m_full] == [m["step"] for m in m_cut]
    assert [m["nmse"] for m in m_full] == [m["nmse"] for m in m_cut]


def test_sweep_on_one_stream_matches_separate_runs(tmp_path):
    src = TensorSource(_data())
    cfgs = [TrainConfig(kind=k, **BASE) for k in ("topk", "mutual_choice")]
    together = train(cfgs, src, tmp_path / "together", progress=False)
    alone = train(cfgs[1], src, tmp_path / "alone", progress=False)
    a, b = SAE.load(together[1]), SAE.load(alone[0])
    assert torch.equal(a.W_dec, b.W_dec)


def test_saved_sae_takes_raw_activations(tmp_path):
    x = 7.0 * _data()  # far from unit scale
    cfg = TrainConfig(kind="topk", **BASE)
    path = train(cfg, TensorSource(x), tmp_path, progress=False)[0]
    sae = SAE.load(path)
    from mcsae.losses import nmse
    assert nmse(x[:1024], sae(x[:1024]).x_hat) < 0.6
    meta_scale = json.loads(__import__("safetensors").safe_open(str(path), "pt").metadata()["metadata"])["input_scale_folded"]
    assert meta_scale == pytest.approx(1 / 7.0 * (x.pow(2).sum(1).mean() / 7.0**2 / 24).rsqrt().item(), rel=0.2)


def test_mismatched_resume_is_refused(tmp_path):
    src = TensorSource(_data())
    cfg = TrainConfig(kind="topk", **BASE)
    train(cfg, src, tmp_path, progress=False, stop_after=12)
    other = TrainConfig(**{**cfg.__dict__, "lr": 1e-3})
    t = Trainer(other, 24, tmp_path / cfg.name)
    with pytest.raises(ValueError, match="different TrainConfig"):
        t.load_checkpoint()
    (tmp_path / cfg.name / "checkpoint.pt").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable"):
        Trainer(cfg, 24, tmp_path / cfg.name).load_checkpoint()


def test_bad_train_configs():
    for bad in [dict(aux="aux_q"), dict(kind="x"), dict(batch_size=0), dict(k=128), dict(n_tokens=10)]:
        with pytest.raises(ValueError):
            TrainConfig(**{**BASE, **bad}).sae_config(24)
