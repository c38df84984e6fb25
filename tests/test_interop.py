"""SAE Lens export and import, sparsify import: checked against the real packages (skipped when not installed)."""
import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from mcsae import interop
from mcsae.cli import main
from mcsae.evaluate import evaluate_run, reconstruction_metrics
from mcsae.interop import (evaluate_external, export_saelens, external_format, load_external, load_saelens, load_sparsify,
                           saelens_names, saelens_tensors)
from mcsae.io import UserError
from mcsae.models import ActivationConfig
from mcsae.sae import SAE, SAEConfig, VARIANTS
from mcsae.store import build_cache, open_cache
from mcsae.train import TensorSource, TrainConfig, fold_input_scale, train
from required import need
from tiny import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def fake_trained(kind: str, d: int = 16, F: int = 96, k: int = 5, scale: float = 2.5, seed: int = 0, **kw) -> SAE:
    "Random weights and thresholds, marked trained, input scale folded (decoder rows of norm 1/scale)."
    torch.manual_seed(seed)
    sae = SAE(SAEConfig(d_in=d, n_features=F, k=k, kind=kind, **kw))
    with torch.no_grad():
        sae.W_enc.normal_().div_(d**0.5)
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.5)
        sae.thresholds.copy_(torch.rand(F) * 0.6 if kind == "feature_choice" else torch.full((F,), 0.35))
        sae.step.fill_(7)
    return fold_input_scale(sae, scale)


def lens_encode_decode(lens, x):
    with torch.no_grad():
        z = lens.encode(x)  # [B, F]
        return z, lens.decode(z)


def assert_same_function(lens, sae: SAE, x, atol=1e-4):
    "SAE Lens's encode/decode equals mcsae's threshold mode: the same active features, the same reconstruction."
    z, x_hat = lens_encode_decode(lens, x)
    out = sae(x, mode="threshold")
    assert torch.equal(z > 0, out.codes.to_dense() > 0)
    assert torch.allclose(x_hat, out.x_hat, atol=atol, rtol=1e-4)
    return z


# ---------------------------------------------------------------- export, checked by the real SAE Lens
@pytest.mark.parametrize("variant", VARIANTS)
def test_export_equals_threshold_mode(tmp_path, variant):
    sl = need("sae_lens")
    fields, _ = VARIANTS[variant]
    kind = fields["kind"]
    sae = fake_trained(**fields)
    out = export_saelens(sae, tmp_path / "x")
    lens = sl.SAE.load_from_disk(out)
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["architecture"] == ("topk" if kind == "topk" else "jumprelu") and lens.cfg.d_sae == 96
    assert torch.allclose(lens.W_dec.norm(dim=1), torch.ones(96), atol=1e-5)  # unit decoder rows
    x = torch.randn(200, 16) * 3 + 0.5
    z = assert_same_function(lens, sae, x)
    if kind == "topk":
        assert lens.cfg.k == 5 and ((z > 0).sum(1) <= 5).all()
    else:  # the thresholds in SAE Lens units: n_i * theta_i, n_i = 1/2.5 here
        assert torch.allclose(lens.threshold, sae.thresholds / 2.5, atol=1e-6)
    if kind == "mutual_choice":
        spread = (lens.threshold.max() - lens.threshold.min()).item()
        assert spread < 1e-6  # one shared threshold, written per feature (times row norms equal up to rounding)
    assert not (out / "sparsity.safetensors").exists()  # no densities known for a bare SAE


def test_export_unfolded_input_scale(tmp_path):
    sl = need("sae_lens")
    sae = fake_trained("mutual_choice", scale=1.0)  # as in training: takes c * x
    out = export_saelens(sae, tmp_path / "x", input_scale=0.4)
    lens = sl.SAE.load_from_disk(out)
    x = torch.randn(100, 16) * 5
    with torch.no_grad():
        expected = sae(x * 0.4, mode="threshold").x_hat / 0.4  # the SAE on raw inputs
        got = lens(x)
    assert torch.allclose(got, expected, atol=1e-4)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    "Tiny TopK, FC and MC runs trained on one stream, laid out as `mcsae train` lays them out."
    root = tmp_path_factory.mktemp("runs")
    torch.manual_seed(0)
    data = torch.randn(2048, 16) @ torch.randn(16, 16) + 1
    cfgs = [TrainConfig(kind=k, n_features=64, k=4, n_tokens=64 * 30, batch_size=64, warmup_steps=5, log_every=10,
                        checkpoint_every=0) for k in ("topk", "feature_choice", "mutual_choice")]
    paths = train(cfgs, TensorSource(data), root, progress=False)
    (root / "activations").mkdir()
    (root / "activations" / "manifest.json").write_text(json.dumps(
        {"model": "smollm2-135m", "hook": "blocks.3", "hook_name": "blocks.3", "context_length": 128, "corpus": "kjv"}))
    return [p.parent for p in paths], data


def test_export_trained_runs(tmp_path, runs):
    sl = need("sae_lens")
    run_dirs, data = runs
    for run in run_dirs:
        out = export_saelens(run, tmp_path / run.name)
        lens = sl.SAE.load_from_disk(out)
        sae = SAE.load(run / "sae.safetensors")
        assert_same_function(lens, sae, data[:300])
        meta = json.loads((out / "cfg.json").read_text())["metadata"]
        assert meta["model_name"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and meta["hook_name"] == "model.layers.3"
        assert meta["context_size"] == 128 and lens.cfg.metadata.hook_name == "model.layers.3"
        assert "dataset_path" not in meta and meta["mcsae"]["corpus"] == "kjv"  # an embedded corpus has no hub path
        density = torch.load(run / "feature_stats.pt")["density"]  # [F] float64, training firing rates
        log_sparsity = load_file(str(out / "sparsity.safetensors"))["sparsity"]
        assert torch.allclose(log_sparsity.double(), (density + 1e-10).log10(), atol=1e-5)
        assert meta["mcsae"]["sparsity_source"].startswith("feature_stats.pt") and meta["mcsae"]["train_batch_size"] == 64
        assert (out / "mcsae_ranks.safetensors").exists() == (sae.cfg.kind == "feature_choice")
        assert load_external(out).batch_size == 64


def test_sparsity_from_eval_json(tmp_path, runs):
    run = runs[0][2]  # MC
    density = torch.rand(64)
    (run / "eval.json").write_text(json.dumps({"modes": {"threshold": {"density": density.tolist()}}}))
    try:
        out = export_saelens(run, tmp_path / "x")
    finally:
        (run / "eval.json").unlink()
    log_sparsity = load_file(str(out / "sparsity.safetensors"))["sparsity"]
    assert torch.allclose(log_sparsity, (density.double() + 1e-10).log10().float())
    assert "eval.json" in json.loads((out / "cfg.json").read_text())["metadata"]["mcsae"]["sparsity_source"]


def test_names():
    assert saelens_names("gpt2", 8)["hook_name"] == "blocks.8.hook_resid_post"
    assert saelens_names("gpt2", "blocks.8")["model_class_name"] == "HookedTransformer"
    assert saelens_names("smollm2-135m", "embed")["hook_name"] == "model.embed_tokens"
    assert saelens_names("gpt2", "transformer.h.2")["hook_name"] == "transformer.h.2"


# ---------------------------------------------------------------- import and round trips
def lens_topk(sl, d=16, F=96, k=6, rescale=False, unit=True, seed=1):
    torch.manual_seed(seed)
    lens = sl.TopKSAE(sl.TopKSAEConfig(d_in=d, d_sae=F, k=k, rescale_acts_by_decoder_norm=rescale))
    with torch.no_grad():
        for p in lens.parameters():
            p.normal_()
        if unit:
            lens.W_dec.div_(lens.W_dec.norm(dim=1, keepdim=True))
    return lens


def test_round_trip_topk(tmp_path):
    sl = need("sae_lens")
    lens = lens_topk(sl)
    lens.save_model(tmp_path / "a")
    sae = load_saelens(tmp_path / "a")
    assert sae.cfg.kind == "topk" and sae.cfg.k == 6
    x = torch.randn(150, 16)
    z, x_hat = lens_encode_decode(lens, x)
    out = sae(x)
    assert torch.equal(z > 0, out.codes.to_dense() > 0) and torch.allclose(out.x_hat, x_hat, atol=1e-4)
    export_saelens(sae, tmp_path / "b")
    again = sl.SAE.load_from_disk(tmp_path / "b")
    for name, value in lens.state_dict().items():
        assert torch.allclose(again.state_dict()[name], value, atol=1e-5), name
    assert again.cfg.k == 6 and type(again).__name__ == "TopKSAE"


def test_import_topk_rescaled_by_decoder_norm(tmp_path):
    sl = need("sae_lens")
    lens = lens_topk(sl, rescale=True, unit=False)
    lens.save_model(tmp_path / "a")
    sae = load_saelens(tmp_path / "a")
    x = torch.randn(150, 16)
    z, x_hat = lens_encode_decode(lens, x)
    assert torch.equal(z > 0, sae(x).codes.to_dense() > 0) and torch.allclose(sae(x).x_hat, x_hat, atol=1e-4)


def test_round_trip_jumprelu_foreign(tmp_path):
    sl = need("sae_lens")
    torch.manual_seed(2)
    lens = sl.JumpReLUSAE(sl.JumpReLUSAEConfig(d_in=16, d_sae=96))
    with torch.no_grad():
        for p in lens.parameters():
            p.normal_()
        lens.W_dec.div_(lens.W_dec.norm(dim=1, keepdim=True))
        lens.threshold.copy_(torch.rand(96) * 2 - 0.5)  # some negative: they only "activate" zeros
    lens.save_model(tmp_path / "a")
    imp = load_external(tmp_path / "a")
    assert imp.format == "saelens" and imp.modes == ("threshold",) and imp.sae.cfg.kind == "mutual_choice"
    x = torch.randn(150, 16)
    assert_same_function(lens, imp.sae, x)
    assert load_external(tmp_path / "a", k=4).modes == ("batch", "threshold")  # BatchTopK with a known k
    export_saelens(imp.sae, tmp_path / "b")
    assert_same_function(sl.SAE.load_from_disk(tmp_path / "b"), imp.sae, x)


def test_round_trip_mcsae_variant(tmp_path):
    sl = need("sae_lens")
    sae = fake_trained("feature_choice", capacities="zipf")
    sae.ranks.copy_(torch.randperm(96) + 1)  # FC's batch mode depends on its capacity ranks
    export_saelens(sae, tmp_path / "a")
    back = load_saelens(tmp_path / "a")
    assert back.cfg == sae.cfg and torch.equal(back.ranks, sae.ranks)  # FC (Zipf) comes back as itself
    x = torch.randn(100, 16) * 2
    for mode in ("threshold", "batch"):
        ours, theirs = back(x, mode=mode), sae(x, mode=mode)
        assert torch.equal(ours.codes.to_dense() > 0, theirs.codes.to_dense() > 0)
        assert torch.allclose(ours.x_hat, theirs.x_hat, atol=1e-4)
    assert load_external(tmp_path / "a").modes == ("batch", "threshold")
    lens = sl.SAE.load_from_disk(tmp_path / "a")
    lens.save_model(tmp_path / "b")  # SAE Lens writes it again: still the same variant, but without the ranks file
    assert load_saelens(tmp_path / "b").cfg == sae.cfg and load_external(tmp_path / "b").modes == ("threshold",)


def test_standard_and_unapplied_b_dec(tmp_path):
    sl = need("sae_lens")
    torch.manual_seed(3)
    lens = sl.StandardSAE(sl.StandardSAEConfig(d_in=16, d_sae=48, apply_b_dec_to_input=False))
    with torch.no_grad():
        for p in lens.parameters():
            p.normal_()
    lens.save_model(tmp_path / "a")
    sae = load_saelens(tmp_path / "a")
    assert_same_function(lens, sae, torch.randn(100, 16))


# ---------------------------------------------------------------- sparsify
def sparsify_checkpoint(path, d=16, F=64, k=4, seed=0, **kw):
    sp = need("sparsify")
    torch.manual_seed(seed)
    coder = sp.SparseCoder(d, sp.SparseCoderConfig(num_latents=F, k=k, **kw))
    with torch.no_grad():
        coder.b_dec.normal_()
        coder.encoder.bias.normal_(0, 0.1)
    coder.save_to_disk(path)
    return coder


def test_sparsify_same_reconstruction(tmp_path):
    coder = sparsify_checkpoint(tmp_path / "ckpt" / "layers.1")
    sae = load_sparsify(tmp_path / "ckpt")  # one hookpoint inside: found
    assert external_format(tmp_path / "ckpt") == "sparsify" and sae.cfg.kind == "topk" and sae.cfg.k == 4
    x = torch.randn(300, 16) * 2
    with torch.no_grad():
        theirs = coder(x)
    ours = sae(x)
    assert torch.allclose(ours.x_hat, theirs.sae_out, atol=1e-5)
    dense = ours.codes.to_dense()
    assert torch.equal(dense.gather(1, theirs.latent_indices), theirs.latent_acts)  # the same latents and values
    m = reconstruction_metrics(sae, [x])
    assert m["nmse"] == pytest.approx(theirs.fvu.item(), rel=1e-5)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    model, tok = tiny_model(n_layer=2, d_model=16, n_head=2)
    path = build_cache(ActivationConfig(corpus="kjv", hook=1, context_length=32, n_tokens=3000), tmp_path_factory.mktemp("c") / "c",
                       model, tok, eval_fraction=0.2, progress=False)
    return open_cache(path), model


def test_evaluate_imported_beside_mcsae(tmp_path, cache, runs, capsys):
    """`mcsae evaluate` takes a sparsify checkpoint and an SAE Lens folder; its NMSE is sparsify's own FVU."""
    c, model = cache
    coder = sparsify_checkpoint(tmp_path / "sp")
    export_saelens(fake_trained("mutual_choice"), tmp_path / "lens")
    main(["evaluate", str(tmp_path / "sp"), str(tmp_path / "lens"), "--cache", str(c.path), "--downstream-contexts", "0",
          "--out", str(tmp_path / "evals")])
    printed = capsys.readouterr().out
    res_sp = json.loads((tmp_path / "evals" / "sp" / "eval.json").read_text())
    res_mc = json.loads((tmp_path / "evals" / "lens" / "eval.json").read_text())
    assert set(res_sp["modes"]) == {"batch"} and set(res_mc["modes"]) == {"batch", "threshold"} and "threshold" in printed
    api = evaluate_external(tmp_path / "lens", c, tmp_path / "evals_api", downstream_contexts=0, progress=False)  # Python
    assert api["modes"] == res_mc["modes"] and (tmp_path / "evals_api" / "lens" / "eval.json").exists()
    x = c.read("eval")[:65_536]
    with torch.no_grad():
        fvu = coder(x).fvu.item()  # one batch: the whole held-out split is smaller than 4096
    assert len(x) < 4096 and res_sp["modes"]["batch"]["nmse"] == pytest.approx(fvu, rel=1e-5)
    # an FC run exported and read back gives the original's metrics in both modes (ranks and batch size kept)
    fc_run = runs[0][1]
    export_saelens(fc_run, tmp_path / "fc", cache=c.path)  # named by this cache (RUN/../activations names another)
    main(["evaluate", str(tmp_path / "fc"), "--cache", str(c.path), "--downstream-contexts", "0", "--out", str(tmp_path / "evals")])
    res_fc = json.loads((tmp_path / "evals" / "fc" / "eval.json").read_text())
    orig = evaluate_run(tmp_path / "orig", c, sae=SAE.load(fc_run / "sae.safetensors"), batch_size=64, downstream_contexts=0,
                        progress=False)
    for mode in ("batch", "threshold"):
        assert res_fc["modes"][mode]["nmse"] == pytest.approx(orig["modes"][mode]["nmse"], rel=1e-5)
        assert res_fc["modes"][mode]["l0_mean"] == orig["modes"][mode]["l0_mean"]
    # the spliced-model loss works for an imported SAE too
    imp = load_external(tmp_path / "sp")
    res = evaluate_run(tmp_path / "api", c, model=model, modes=imp.modes, sae=imp.sae, downstream_contexts=2, progress=False)
    assert 0 <= res["downstream"]["saes"]["batch"]["kl"] and (tmp_path / "api" / "eval.json").exists()


# ---------------------------------------------------------------- refusals and safety
def test_refusals(tmp_path):
    uneven = fake_trained("topk")
    with torch.no_grad():
        uneven.W_dec[3] *= 1.5
    with pytest.raises(ValueError, match="differ in norm"):
        saelens_tensors(uneven)
    with pytest.raises(ValueError, match="never trained"):
        saelens_tensors(SAE(SAEConfig(d_in=8, n_features=32, k=2, kind="mutual_choice")))
    nan = fake_trained("feature_choice")
    nan.thresholds[0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        saelens_tensors(nan)

    def lens_dir(name, cfg, tensors):
        d = tmp_path / name
        d.mkdir()
        (d / "cfg.json").write_text(json.dumps({"d_in": 4, "d_sae": 8, "dtype": "float32", **cfg}))
        save_file(tensors, str(d / "sae_weights.safetensors"))
        return d

    ok = {"W_enc": torch.zeros(4, 8), "b_enc": torch.zeros(8), "W_dec": torch.zeros(8, 4), "b_dec": torch.zeros(4)}
    cases = [({"architecture": "gated"}, ok, "architecture 'gated'"),
             ({"architecture": "topk", "k": 2, "normalize_activations": "layer_norm"}, ok, "normalize_activations"),
             ({"architecture": "topk", "k": 2, "reshape_activations": "hook_z"}, ok, "hook_z"),
             ({"architecture": "topk", "k": 8}, ok, "k=8"),
             ({"architecture": "jumprelu"}, ok, "threshold expected"),
             ({"architecture": "topk", "k": 2}, {**ok, "W_dec": torch.zeros(8, 5)}, "W_dec expected")]
    for i, (cfg, tensors, match) in enumerate(cases):
        with pytest.raises(ValueError, match=match):
            load_saelens(lens_dir(f"c{i}", cfg, tensors))
    (tmp_path / "c0" / "cfg.json").write_text(json.dumps({"architecture": "topk"}))
    with pytest.raises(ValueError, match="lacks d_in"):
        load_saelens(tmp_path / "c0")
    (tmp_path / "c0" / "cfg.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_saelens(tmp_path / "c0")
    with pytest.raises(UserError, match="no cfg.json"):
        load_saelens(tmp_path)
    with pytest.raises(ValueError, match="neither"):
        load_external(tmp_path)


def test_sparsify_refusals(tmp_path):
    sparsify_checkpoint(tmp_path / "g", activation="groupmax")
    with pytest.raises(ValueError, match="groupmax"):
        load_sparsify(tmp_path / "g")
    sparsify_checkpoint(tmp_path / "t", transcode=True)
    with pytest.raises(ValueError, match="transcoder"):
        load_sparsify(tmp_path / "t")
    sparsify_checkpoint(tmp_path / "two" / "a")
    sparsify_checkpoint(tmp_path / "two" / "b")
    with pytest.raises(ValueError, match="2 hookpoints"):
        load_sparsify(tmp_path / "two")


def test_never_overwrites(tmp_path, runs, capsys):
    run = runs[0][0]
    out = tmp_path / "x"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(UserError, match="overwrite"):
        export_saelens(run, out)
    with pytest.raises(UserError, match="not an SAE Lens export written by mcsae"):
        export_saelens(run, out, overwrite=True)  # --overwrite replaces only an export of mcsae's
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    for extra in ([], ["--overwrite"]):
        with pytest.raises(SystemExit, match="2"):
            main(["export", str(run), "--out", str(out), *extra])
        assert re.match(rf"mcsae: error: {re.escape(str(out))} (exists|is not an SAE Lens export)", capsys.readouterr().err)
    assert (out / "mine.txt").read_text() == "keep"
    (out / "mine.txt").unlink()  # an empty folder: written into without --overwrite
    cache = tmp_path / "other-cache"
    cache.mkdir()
    (cache / "manifest.json").write_text(json.dumps({"model": "gpt2", "hook": "blocks.5", "hook_name": "transformer.h.5",
                                                      "context_length": 64, "corpus": "NeelNanda/pile-10k"}))
    main(["export", str(run / "sae.safetensors"), "--out", str(out), "--cache", str(cache)])
    assert sorted(p.name for p in out.iterdir()) == ["cfg.json", "sae_weights.safetensors", "sparsity.safetensors"]
    meta = json.loads((out / "cfg.json").read_text())["metadata"]
    assert meta["hook_name"] == "blocks.5.hook_resid_post" and meta["model_name"] == "gpt2"
    assert meta["dataset_path"] == "NeelNanda/pile-10k" and meta["model_class_name"] == "HookedTransformer"
    main(["export", str(run), "--out", str(out), "--overwrite", "--hook-name", "custom.hook"])  # its own export: replaced
    assert json.loads((out / "cfg.json").read_text())["metadata"]["hook_name"] == "custom.hook"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left
    with pytest.raises(SystemExit, match="2"):
        main(["export", str(run), "--out", str(tmp_path / "y"), "--cache", str(tmp_path / "nowhere")])
    assert capsys.readouterr().err.startswith("mcsae: error: no activation cache")


def test_provenance_comes_from_the_sae_and_a_cache_of_other_activations_is_refused(tmp_path, runs):
    "The SAE's recorded model, hook and context length go into cfg.json; --cache only fills gaps and must agree."
    sae = SAE.load(runs[0][0] / "sae.safetensors")
    sae.provenance = {"model": "gpt2", "hook": "blocks.5", "corpus": "NeelNanda/pile-10k", "context_length": 64, "d_model": 16}
    meta = json.loads((export_saelens(sae, tmp_path / "a") / "cfg.json").read_text())["metadata"]
    assert (meta["model_name"], meta["hook_name"], meta["context_size"], meta["dataset_path"]) == \
        ("gpt2", "blocks.5.hook_resid_post", 64, "NeelNanda/pile-10k")
    assert load_saelens(tmp_path / "a").provenance == sae.provenance  # read back: evaluate can check it
    cache = tmp_path / "c"
    cache.mkdir()
    (cache / "manifest.json").write_text(json.dumps({"model": "gpt2", "hook": "blocks.6", "context_length": 64}))
    with pytest.raises(UserError, match=r"hook 'blocks.5' vs 'blocks.6'.*leave out --cache"):
        export_saelens(sae, tmp_path / "b", cache=cache)
    assert not (tmp_path / "b").exists()
    sae.provenance = {"d_model": 16}  # an SAE trained through the API on bare tensors: the cache names it
    meta = json.loads((export_saelens(sae, tmp_path / "b", cache=cache) / "cfg.json").read_text())["metadata"]
    assert meta["hook_name"] == "blocks.6.hook_resid_post"


def test_missing_weights_name_the_saelens_layout(tmp_path):
    (tmp_path / "cfg.json").write_text(json.dumps({"architecture": "topk", "k": 2, "d_in": 4, "d_sae": 8}))
    with pytest.raises(UserError, match="SAE Lens folder holds sae_weights.safetensors") as e:
        load_saelens(tmp_path)
    assert "run folder" not in str(e.value)


def test_failed_write_leaves_nothing(tmp_path, runs, monkeypatch):
    with pytest.raises(ValueError, match="density"):
        export_saelens(runs[0][1], tmp_path / "x", density=torch.ones(3))
    export_saelens(runs[0][1], tmp_path / "old")

    def crash(*args, **kw):
        raise OSError("disk full")

    monkeypatch.setattr(interop, "save_file", crash)  # cfg.json is written, then the weights fail
    for target in ("new", "old"):
        with pytest.raises(OSError, match="disk full"):
            export_saelens(runs[0][1], tmp_path / target, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]  # nothing half-written, the old export intact
    assert sorted(p.name for p in (tmp_path / "old").iterdir()) == ["cfg.json", "mcsae_ranks.safetensors", "sae_weights.safetensors",
                                                                   "sparsity.safetensors"]


@pytest.mark.parametrize("hook_name,cache_hook,same", [
    ("blocks.8.hook_resid_post", "blocks.8", True),
    ("blocks.8.hook_resid_pre", "blocks.7", True),  # the input of block 8 is the output of block 7
    ("blocks.0.hook_resid_pre", "embed", True),
    ("model.layers.3", "blocks.3", True),
    ("transformer.h.2", "blocks.2", True),
    ("blocks.8.hook_resid_pre", "blocks.8", False),  # one block later
    ("blocks.8.hook_resid_post", "blocks.7", False),
    ("blocks.8.hook_mlp_out", "blocks.8", False),  # not the residual stream
])
def test_imported_hook_is_compared_as_a_residual_position(hook_name, cache_hook, same):
    "A foreign SAE's hook_name is compared by the residual-stream position it reads, not by its block number."
    from mcsae.interop import Imported, imported_mismatch

    imp = Imported(SAE(SAEConfig(d_in=16, n_features=32, k=4)), ("batch",), "saelens", "x", hook_name=hook_name)
    diff = imported_mismatch(imp, {"model": "gpt2", "hook": cache_hook, "d_model": 16})
    assert (diff == "") == same, diff
    assert imported_mismatch(imp, {"model": "gpt2", "hook": "transformer.h.3.mlp", "d_model": 16}) == ""  # cannot tell
