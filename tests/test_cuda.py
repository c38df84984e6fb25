"""The same code on a GPU: allocation, sparse autograd and a training step on CUDA.

Skipped where no CUDA device is present (CI has none); run with `pytest tests/test_cuda.py` on a GPU machine.
"""
import pytest
import torch

from mcsae.allocation import allocate, feature_choice_mask, mutual_choice_mask, topk_mask, zipf_capacities
from mcsae.sae import KINDS, SAE, SAEConfig, dense_reference
from mcsae.train import TensorSource, TrainConfig, Trainer, train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEV = "cuda"


def _affinities(B, F, seed, ties=False):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, F, generator=g).relu()  # about half zeros
    if ties:
        z = (z * 3).round() / 3  # few distinct values: ties everywhere
    return z


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_allocation_on_cuda_equals_reference_masks(ties, seed):
    z = _affinities(512, 3000, seed, ties)
    zc = z.to(DEV)
    caps = zipf_capacities(3000, 16 * 512, s=0.8, max_per_feature=512)
    cases = [("topk", dict(k=16), topk_mask(z, 16)),
             ("mutual_choice", dict(budget=16 * 512), mutual_choice_mask(z, 16 * 512)),
             ("feature_choice", dict(capacities=caps.to(DEV)), feature_choice_mask(z, caps))]
    for kind, kw, ref in cases:
        alloc = allocate(zc, kind, **kw)
        assert alloc.token.device.type == "cuda", kind
        assert torch.equal(alloc.to_mask().cpu(), ref), kind


@pytest.mark.parametrize("kind", KINDS)
def test_sparse_path_on_cuda_matches_dense_reference(kind):
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=64, n_features=512, k=8, kind=kind), device=DEV)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.2)
        sae.W_enc.add_(0.3 * torch.randn_like(sae.W_enc))
    x = torch.randn(300, 64, device=DEV)
    target = torch.randn(300, 64, device=DEV)
    out = sae(x)
    params = list(sae.parameters())
    grads = torch.autograd.grad(((out.x_hat - target) ** 2).sum(), params)
    ref = dense_reference(sae, x, out.codes.alloc.to_mask())
    grads_ref = torch.autograd.grad(((ref - target) ** 2).sum(), params)
    torch.testing.assert_close(out.x_hat, ref, rtol=1e-4, atol=1e-4)
    for (name, _), g, gr in zip(sae.named_parameters(), grads, grads_ref):
        torch.testing.assert_close(g, gr, rtol=1e-3, atol=1e-3, msg=name)


@pytest.mark.parametrize("kind", KINDS)
def test_cpu_and_cuda_agree(kind):
    torch.manual_seed(1)
    cpu = SAE(SAEConfig(d_in=64, n_features=512, k=8, kind=kind)).eval()
    gpu = SAE(cpu.cfg, device=DEV).eval()
    gpu.load_state_dict(cpu.state_dict())
    torch.backends.cuda.matmul.allow_tf32 = False
    x = torch.randn(256, 64)
    a, b = cpu(x), gpu(x.to(DEV))
    assert torch.equal(a.codes.alloc.to_mask(), b.codes.alloc.to_mask().cpu())  # same pairs (no near-ties here)
    torch.testing.assert_close(a.x_hat, b.x_hat.cpu(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_training_step_on_cuda_with_autocast(kind, tmp_path):
    torch.manual_seed(0)
    d, F = 64, 512
    basis = torch.randn(F, d, device=DEV)
    codes = torch.rand(4096, F, device=DEV) * (torch.rand(4096, F, device=DEV) < 8 / F)
    data = codes @ basis  # sparse structure to recover
    cfg = TrainConfig(kind=kind, n_features=F, k=8, batch_size=256, n_tokens=256 * 60, warmup_steps=5,
                      autocast=True)
    t = Trainer(cfg, d, tmp_path, device=DEV)
    t.initialize(data[:1024])
    first = [t.step(data[i * 256:(i + 1) * 256])["nmse"] for i in range(3)]
    for i in range(57):
        last = t.step(data[(i % 16) * 256:(i % 16 + 1) * 256])["nmse"]
    assert all(p.dtype == torch.float32 and p.device.type == "cuda" for p in t.sae.parameters())  # fp32 state
    assert last < 0.7 * first[0], (first, last)


def test_train_on_cuda_saves_a_checkpoint_that_loads_on_cpu(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2048, 32)
    cfg = TrainConfig(kind="mutual_choice", n_features=128, k=4, batch_size=256, n_tokens=2048)
    train(cfg, TensorSource(x), tmp_path, device=DEV, progress=False)
    sae = SAE.load(tmp_path / cfg.name / "sae.safetensors", device="cpu")
    assert sae.W_enc.device.type == "cpu"
    out = sae.eval()(x[:64])
    assert torch.isfinite(out.x_hat).all()
