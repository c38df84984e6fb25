"""Reliability: the `mcsae` command driven as a user would, attacked with bad input, faults, kills and races.

Each test is named after the class of failure it guards against (README, section Reliability). Runs are tiny
(a 2-block GPT-2 of width 16, a 32-feature SAE, batches of 64): the whole module takes about a minute of CPU
time; eight of its tests run mcsae in child processes (3-4 minutes of wall time on a busy 2-core machine).
Processes are cut at chosen instants either from outside (a signal to their process id) or with the test hook
`MCSAE_FAULT=<point>[=SIGNAL]`, which makes mcsae signal itself at that point (default SIGKILL):
  checkpoint:<run>:<step>   just after <run> wrote its checkpoint at <step>
  write:<file>              inside an atomic write of <file>, after the data went to its temporary file
  shard:<i>                 while building a cache, just after shard <i> went to the temporary folder
"""
from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from mcsae.cli import main
from mcsae.sae import SAE

from clitools import run_main
from tiny import tiny_model  # the offline tiny GPT-2 of the tests (tests/tiny.py)

RUN = "topk-none-k4-F32-s0"  # the run name the CLI derives for train_args()
MC_RUN = "mutual_choice-none-k4-F32-s0"
FC_RUN = "feature_choice-zipf-none-k4-F32-s0"
ENTRY = [sys.executable, "-c", "from mcsae.cli import main; main()"]


# ---------------------------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _env(**extra) -> dict:
    "Environment for child processes: this checkout first on the path, one thread, no fault unless asked."
    env = {k: v for k, v in os.environ.items() if k != "MCSAE_FAULT"}
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", **extra)
    return env


def spawn(*args, **env) -> subprocess.Popen:
    "Start `mcsae ARGS` in a child process."
    return subprocess.Popen(ENTRY + [str(a) for a in args], env=_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def cli(*args, timeout: float = 300, **env) -> subprocess.CompletedProcess:
    "Run `mcsae ARGS` in a child process to the end."
    return subprocess.run(ENTRY + [str(a) for a in args], env=_env(**env), capture_output=True, text=True, timeout=timeout)


def last_line(err: str) -> str:
    "The last non-empty line of stderr (progress bars redraw with carriage returns)."
    lines = [l.strip() for l in err.replace("\r", "\n").splitlines() if l.strip()]
    return lines[-1] if lines else ""


def assert_user_error(code, err: str, *words: str) -> str:
    "Exit status 2, no traceback, one line 'mcsae: error: ...' naming each of words."
    line = last_line(err)
    assert "Traceback" not in err, err[-3000:]
    assert code == 2, (code, err[-2000:])
    assert line.startswith("mcsae: error: "), err[-2000:]
    for w in words:
        assert w.lower() in line.lower(), (w, line)
    return line


def wait_for(pred, proc: subprocess.Popen | None = None, timeout: float = 120) -> None:
    "Poll until pred() holds (fail early if the process ends first)."
    end = time.time() + timeout
    while not pred():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended first (rc {proc.returncode}): {proc.stderr.read()[-3000:]}")
        if time.time() > end:
            raise AssertionError("timed out waiting")
        time.sleep(0.05)


def train_args(out, *extra, cache=None, steps: int = 40) -> list:
    "A tiny `mcsae train` on the module's cache: 32 features, k=4, batches of 64, checkpoints every 10 steps."
    return ["train", "--cache", cache or CACHE, "--out", out, "--n-features", 32, "--k", 4, "--batch-size", 64,
            "--n-tokens", 64 * steps, "--warmup-steps", 2, "--log-every", 5, "--checkpoint-every", 10,
            "--dead-tokens", 640, *extra]


def tensors(path) -> dict:
    "The tensors of a saved SAE."
    return SAE.load(path).state_dict()


def metadata(path) -> dict:
    "The training metadata stored in a saved SAE."
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        return json.loads((f.metadata() or {}).get("metadata", "{}"))


def steps_logged(run_dir) -> list[int]:
    "Steps of the metrics lines of a run (every line must be valid JSON)."
    return [json.loads(l)["step"] for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if l.strip()]


def hidden(folder) -> list[str]:
    "Names of hidden entries (temporary files and folders) in a folder."
    return sorted(p.name for p in Path(folder).iterdir() if p.name.startswith("."))


def temporaries(folder) -> list[str]:
    "Temporary files and folders (of killed writes) anywhere under folder."
    return sorted(str(p) for p in Path(folder).rglob("*") if ".tmp" in p.name or ".old" in p.name or ".new" in p.name)


CACHE = MODEL = CORPUS = None  # set by the module fixture `world`


@pytest.fixture(scope="module", autouse=True)
def world(tmp_path_factory):
    "A tiny model on disk, a small text corpus, and an activation cache at hook 1 built by `mcsae cache` under umask 027."
    global CACHE, MODEL, CORPUS
    root = tmp_path_factory.mktemp("world")
    model, tok = tiny_model(n_layer=2, d_model=16, n_head=2, n_positions=64)
    model.save_pretrained(root / "tiny")
    tok.save_pretrained(root / "tiny")
    MODEL, CORPUS, CACHE = str(root / "tiny"), "kjv", str(root / "cache")
    old = os.umask(0o027)
    try:
        main(["cache", "--model", MODEL, "--hook", "1", "--corpus", CORPUS, "--context-length", "32", "--n-tokens", "4000",
              "--eval-fraction", "0.2", "--out", CACHE])
    finally:
        os.umask(old)
    return root


def copy_cache(dst, **manifest_changes) -> str:
    "A copy of the module's cache, optionally with manifest fields changed (to fake provenance)."
    shutil.copytree(CACHE, dst)
    if manifest_changes:
        mf = Path(dst) / "manifest.json"
        m = json.loads(mf.read_text())
        m.update(manifest_changes)
        mf.write_text(json.dumps(m))
    return str(dst)


# --------------------------------------------------------------------------------- unresumable run
def test_multi_sae_run_killed_between_checkpoints_resumes(tmp_path, capsys):
    "Killed after the first SAE's checkpoint and before the second's: --resume finishes both, as if never cut."
    kill = cli(*train_args(tmp_path / "cut", "--kind", "topk,mutual_choice"), MCSAE_FAULT=f"checkpoint:{RUN}:10")
    assert kill.returncode == -signal.SIGKILL, kill.stderr[-2000:]
    assert (tmp_path / "cut" / RUN / "checkpoint.pt").exists() and not (tmp_path / "cut" / MC_RUN / "checkpoint.pt").exists()
    code, out, err = run_main(capsys, *train_args(tmp_path / "cut", "--kind", "topk,mutual_choice", "--resume"))
    assert code == 0, err[-3000:]
    code, out, err = run_main(capsys, *train_args(tmp_path / "full", "--kind", "topk,mutual_choice"))
    assert code == 0, err[-3000:]
    for run in (RUN, MC_RUN):
        a, b = tensors(tmp_path / "cut" / run / "sae.safetensors"), tensors(tmp_path / "full" / run / "sae.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a), run
        assert steps_logged(tmp_path / "cut" / run) == steps_logged(tmp_path / "full" / run) == list(range(5, 41, 5))
        assert metadata(tmp_path / "cut" / run / "sae.safetensors")["final"]["nmse"] == \
            metadata(tmp_path / "full" / run / "sae.safetensors")["final"]["nmse"]


# ---------------------------------------------------------------------------- a loaded SAE changes itself
def test_loaded_sae_is_in_eval_mode_and_inference_does_not_drift(tmp_path, capsys):
    code, _, err = run_main(capsys, *train_args(tmp_path, "--kind", "feature_choice"))
    assert code == 0, err[-3000:]
    sae = SAE.load(tmp_path / FC_RUN / "sae.safetensors")
    assert not sae.training
    before = {k: v.clone() for k, v in sae.state_dict().items()}
    x = torch.randn(300, 16)
    l0_first = sae(x[:64], mode="threshold").codes.l0().float().mean()
    for i in range(300):
        sae(x[i:i + 1])
        sae(x[i:i + 1], mode="threshold")
    assert all(torch.equal(before[k], v) for k, v in sae.state_dict().items())
    assert sae(x[:64], mode="threshold").codes.l0().float().mean() == l0_first


# ------------------------------------------------------------------------------------------ provenance
def test_provenance_is_recorded_with_every_sae_and_cache(tmp_path, capsys):
    code, _, err = run_main(capsys, *train_args(tmp_path))
    assert code == 0, err[-3000:]
    manifest = json.loads((Path(CACHE) / "manifest.json").read_text())
    assert manifest["model"] == MODEL and manifest["hook"] == "blocks.1" and manifest["d_model"] == 16
    assert manifest["context_length"] == 32 and manifest["corpus"] == CORPUS
    want = {"model": MODEL, "hook": "blocks.1", "corpus": CORPUS, "context_length": 32, "d_model": 16}
    assert metadata(tmp_path / RUN / "sae.safetensors")["activations"] == want
    assert SAE.load(tmp_path / RUN / "sae.safetensors").provenance == want
    checkpoint = torch.load(tmp_path / RUN / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert checkpoint["activations"] == want  # a resume is checked against it


def test_train_out_with_other_hook_does_not_reuse_its_cache(tmp_path, capsys):
    "`train --out X --hook 0` must not train on X/activations built at hook 1."
    copy_cache(tmp_path / "activations")
    args = ["train", "--out", tmp_path, "--model", MODEL, "--corpus", CORPUS, "--context-length", 32, "--hook", 0,
            "--n-features", 32, "--k", 4, "--batch-size", 64, "--n-tokens", 640]
    code, _, err = run_main(capsys, *args)
    assert_user_error(code, err, "hook", "activations")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["activations"]


@pytest.mark.parametrize("option,value", [("--hook", "0"), ("--model", "gpt2"), ("--corpus", "shakespeare"),
                                          ("--context-length", "64")])
def test_train_cache_conflicting_with_options_is_refused(tmp_path, capsys, option, value):
    code, _, err = run_main(capsys, *train_args(tmp_path, option, value))
    assert_user_error(code, err, option.lstrip("-").replace("-", "_").split("_")[0])
    assert not (tmp_path / RUN).exists()


def test_evaluate_and_resume_refuse_a_cache_of_another_layer(tmp_path, capsys):
    code, _, err = run_main(capsys, *train_args(tmp_path / "runs"))
    assert code == 0, err[-3000:]
    other = copy_cache(tmp_path / "hook0", hook="blocks.0", hook_name="blocks.0")
    code, _, err = run_main(capsys, "evaluate", tmp_path / "runs" / RUN, "--cache", other, "--downstream-contexts", 0)
    assert_user_error(code, err, "hook")
    assert not (tmp_path / "runs" / RUN / "eval.json").exists()
    # resume on another layer's cache
    kill = cli(*train_args(tmp_path / "cut"), MCSAE_FAULT=f"checkpoint:{RUN}:10")
    assert kill.returncode == -signal.SIGKILL, kill.stderr[-2000:]
    code, _, err = run_main(capsys, *train_args(tmp_path / "cut", "--resume", cache=other))
    assert_user_error(code, err, "hook")


def test_export_records_the_provenance_the_sae_recorded(tmp_path, capsys):
    "Without --cache (and no RUN/../activations: trained with --cache), the export's cfg.json names model, hook, context."
    run = _trained(tmp_path, capsys)
    assert not (run.parent / "activations").exists()
    code, _, err = run_main(capsys, "export", run, "--out", tmp_path / "lens")
    assert code == 0, err[-3000:]
    meta = json.loads((tmp_path / "lens" / "cfg.json").read_text())["metadata"]
    assert meta["model_name"] == MODEL and meta["hook_name"] == "blocks.1.hook_resid_post" and meta["context_size"] == 32
    assert (meta["mcsae"]["model"], meta["mcsae"]["hook"], meta["mcsae"]["context_length"]) == (MODEL, "blocks.1", 32)


def test_commands_refuse_a_cache_of_other_activations_than_the_sae(tmp_path, capsys):
    "export --cache, dashboard and evaluate (of an SAE Lens export too) refuse a cache of another hook or model."
    run = _trained(tmp_path, capsys)
    hook0 = copy_cache(tmp_path / "hook0", hook="blocks.0", hook_name="transformer.h.0")
    gpt2 = copy_cache(tmp_path / "gpt2", model="gpt2")
    for cache, words in ((hook0, ("'blocks.1'", "'blocks.0'", "--cache")), (gpt2, ("gpt2", MODEL, "--cache"))):
        code, _, err = run_main(capsys, "export", run, "--out", tmp_path / "lens", "--cache", cache)
        assert_user_error(code, err, *words)
        code, _, err = run_main(capsys, "dashboard", run, "--cache", cache, "--out", tmp_path / "site", *DASHBOARD)
        assert_user_error(code, err, *words)
    assert not (tmp_path / "lens").exists() and not (tmp_path / "site").exists()
    code, _, err = run_main(capsys, "export", run, "--out", tmp_path / "lens")
    assert code == 0, err[-3000:]
    code, _, err = run_main(capsys, "evaluate", tmp_path / "lens", "--cache", hook0, "--downstream-contexts", 0,
                            "--out", tmp_path / "evals")
    assert_user_error(code, err, "'blocks.1'", "'blocks.0'", str(tmp_path / "lens"))
    cfg = json.loads((tmp_path / "lens" / "cfg.json").read_text())  # the same folder as another library writes it
    cfg["metadata"] = {"model_name": "gpt2", "hook_name": "blocks.0.hook_resid_post"}
    (tmp_path / "lens" / "cfg.json").write_text(json.dumps(cfg))
    code, _, err = run_main(capsys, "evaluate", tmp_path / "lens", "--cache", CACHE, "--downstream-contexts", 0,
                            "--out", tmp_path / "evals")
    assert_user_error(code, err, "blocks.0.hook_resid_post", "'blocks.1'")  # its hook vs the cache's, named
    assert not (tmp_path / "evals").exists()
    code, _, err = run_main(capsys, "evaluate", tmp_path / "lens", "--cache", hook0, "--downstream-contexts", 0,
                            "--out", tmp_path / "evals")
    assert code == 0, err[-3000:]  # its own layer: evaluated


def test_dashboard_of_features_the_sae_lacks_is_refused(tmp_path, capsys):
    run = _trained(tmp_path, capsys)
    code, _, err = run_main(capsys, "dashboard", run, "--cache", CACHE, "--out", tmp_path / "site", "--model", "none",
                            "--features", 999)
    assert_user_error(code, err, "999", "32 features", "0-31")
    assert not (tmp_path / "site").exists()


def test_splicing_at_another_layer_is_refused(tmp_path, capsys):
    from mcsae.evaluate import downstream_losses
    code, _, err = run_main(capsys, *train_args(tmp_path))
    assert code == 0, err[-3000:]
    sae = SAE.load(tmp_path / RUN / "sae.safetensors")
    model, _ = tiny_model(n_layer=2, d_model=16, n_head=2, n_positions=64)
    ids = torch.randint(3, 60, (2, 16))
    with pytest.raises(ValueError, match="blocks.1"):
        downstream_losses(model, ids, 0, {"sae": (sae, "batch")})
    assert set(downstream_losses(model, ids, 1, {"sae": (sae, "batch")})["saes"]) == {"sae"}


def test_resume_on_a_cache_of_another_width_is_refused(tmp_path, capsys):
    code, _, err = run_main(capsys, *train_args(tmp_path / "runs"))
    assert code == 0, err[-3000:]
    (tmp_path / "runs" / RUN / "sae.safetensors").unlink()  # an unfinished run: its checkpoint is what --resume reads
    narrow = Path(copy_cache(tmp_path / "narrow"))
    m = json.loads((narrow / "manifest.json").read_text())
    for s in m["shards"]:
        arr = np.load(narrow / s["file"])[:, :8].copy()
        np.save(narrow / s["file"], arr)
        s["bytes"] = (narrow / s["file"]).stat().st_size
    m["d_model"] = 8
    (narrow / "manifest.json").write_text(json.dumps(m))
    code, _, err = run_main(capsys, *train_args(tmp_path / "runs", "--resume", cache=narrow))
    assert_user_error(code, err, "16", "8")


# ------------------------------------------------------------------------------------------- data loss
def test_cache_overwrite_only_replaces_what_mcsae_made(tmp_path, capsys):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "mine.txt").write_text("precious")
    args = ["cache", "--model", MODEL, "--hook", 1, "--corpus", CORPUS, "--context-length", 32, "--n-tokens", 1000]
    code, _, err = run_main(capsys, *args, "--out", notes, "--overwrite")
    assert_user_error(code, err, str(notes))
    assert (notes / "mine.txt").read_text() == "precious"
    code, _, err = run_main(capsys, *train_args(tmp_path / "runs"))
    assert code == 0
    code, _, err = run_main(capsys, *args, "--out", tmp_path / "runs" / RUN, "--overwrite")
    assert_user_error(code, err)
    assert (tmp_path / "runs" / RUN / "sae.safetensors").exists()
    annotated = Path(copy_cache(tmp_path / "annotated"))
    (annotated / "README.txt").write_text("my notes on this cache")
    code, _, err = run_main(capsys, *args, "--out", annotated, "--overwrite")
    assert_user_error(code, err, "README.txt")
    assert (annotated / "README.txt").exists() and (annotated / "manifest.json").exists()
    plain = Path(copy_cache(tmp_path / "plain"))
    code, _, err = run_main(capsys, *args, "--out", plain, "--overwrite")
    assert code == 0, err[-3000:]
    assert json.loads((plain / "manifest.json").read_text())["n_tokens"] < 1100
    assert hidden(tmp_path) == []


def _trained(tmp_path, capsys) -> Path:
    "A tiny trained run folder (on the module's cache) for the commands that read one."
    code, _, err = run_main(capsys, *train_args(tmp_path / "runs"))
    assert code == 0, err[-3000:]
    return tmp_path / "runs" / RUN


DASHBOARD = ["--model", "none", "--features", "0-3", "--n-top", 3, "--chunk-tokens", 256]


@pytest.mark.parametrize("command", ["export", "dashboard"])
def test_export_and_dashboard_overwrite_only_replace_what_mcsae_made(tmp_path, capsys, command):
    "`--overwrite` replaces an export or a dashboard mcsae wrote, never a folder holding a file of the user's."
    run = _trained(tmp_path, capsys)
    args = [command, run, *(["--cache", CACHE] + DASHBOARD if command == "dashboard" else [])]
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "thesis.tex").write_text("years of work")
    code, _, err = run_main(capsys, *args, "--out", thesis, "--overwrite")
    assert_user_error(code, err, str(thesis), "not")  # not an export / a dashboard of mcsae's
    assert [p.name for p in thesis.iterdir()] == ["thesis.tex"] and (thesis / "thesis.tex").read_text() == "years of work"
    out = tmp_path / "out"
    code, _, err = run_main(capsys, *args, "--out", out)
    assert code == 0, err[-3000:]
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    code, _, err = run_main(capsys, *args, "--out", out)
    assert_user_error(code, err, str(out), "--overwrite")  # exists: replaced only when asked
    (out / "notes.txt").write_text("mine")
    (out / "sub").mkdir()
    (out / "sub" / "deep.txt").write_text("mine too")
    code, _, err = run_main(capsys, *args, "--out", out, "--overwrite")
    assert_user_error(code, err, "notes.txt", "sub/deep.txt")
    assert (out / "notes.txt").read_text() == "mine" and (out / "sub" / "deep.txt").read_text() == "mine too"
    (out / "notes.txt").unlink()
    shutil.rmtree(out / "sub")
    code, _, err = run_main(capsys, *args, "--out", out, "--overwrite")  # only mcsae's files: replaced, whole
    assert code == 0, err[-3000:]
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == written
    assert hidden(tmp_path) == []


def test_refused_train_leaves_no_folder(tmp_path, capsys):
    "A train refused after its options were read (here: a cache of another hook) creates no --out folder."
    out = tmp_path / "new" / "runs"
    code, _, err = run_main(capsys, *train_args(out, "--hook", 0))
    assert_user_error(code, err, "hook")
    assert list(tmp_path.iterdir()) == []
    code, _, err = run_main(capsys, "train", "--out", out, "--model", MODEL, "--hook", 1, "--corpus", tmp_path / "none.txt",
                            "--context-length", 32, "--n-features", 32, "--k", 4, "--batch-size", 64, "--n-tokens", 640)
    assert_user_error(code, err, "none.txt")  # refused while building OUT/activations: the folders it made are gone
    assert list(tmp_path.iterdir()) == []


def test_interrupted_overwrite_keeps_the_old_run_whole(tmp_path, capsys):
    code, _, err = run_main(capsys, *train_args(tmp_path))
    assert code == 0, err[-3000:]
    run = tmp_path / RUN
    old = {p.name: p.read_bytes() for p in run.iterdir()}
    kill = cli(*train_args(tmp_path, "--overwrite", "--lr", "1e-3"), MCSAE_FAULT=f"checkpoint:{RUN}:20")
    assert kill.returncode == -signal.SIGKILL, kill.stderr[-2000:]
    assert {p.name: p.read_bytes() for p in run.iterdir()} == old  # the old run, whole: no new checkpoint beside it
    code, _, err = run_main(capsys, *train_args(tmp_path, "--overwrite", "--lr", "1e-3"))
    assert code == 0, err[-3000:]
    assert metadata(run / "sae.safetensors")["train_config"]["lr"] == 1e-3
    assert steps_logged(run) == list(range(5, 41, 5))
    assert hidden(tmp_path) in ([], [f".{RUN}.lock"]) and temporaries(tmp_path) == []


def test_resume_of_a_finished_run_changes_nothing(tmp_path, capsys):
    code, _, err = run_main(capsys, *train_args(tmp_path))
    assert code == 0, err[-3000:]
    run = tmp_path / RUN
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    code, out, err = run_main(capsys, *train_args(tmp_path, "--resume"))
    assert code == 0, err[-3000:]
    assert "finished" in (out + err).lower()
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    (run / "checkpoint.pt").unlink()  # without its checkpoint: still finished, never retrained
    del before["checkpoint.pt"]
    code, out, err = run_main(capsys, *train_args(tmp_path, "--resume"))
    assert code == 0, err[-3000:]
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    assert metadata(run / "sae.safetensors")["final"]["step"] == 40


def test_two_trains_into_one_folder_and_a_stale_lock(tmp_path, capsys):
    "A second train into a folder being trained is refused naming the first's pid; once that is killed, the lock is stale."
    first = spawn(*train_args(tmp_path, steps=200_000))
    try:
        wait_for(lambda: (tmp_path / RUN / "checkpoint.pt").exists(), first)
        for extra in ([], ["--overwrite"], ["--resume"]):
            code, _, err = run_main(capsys, *train_args(tmp_path, *extra, steps=200_000))
            assert_user_error(code, err, str(first.pid))
        assert first.poll() is None  # the first run goes on, undisturbed
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
    code, _, err = run_main(capsys, *train_args(tmp_path, "--overwrite"))  # the dead process's lock does not block
    assert code == 0, err[-3000:]
    assert steps_logged(tmp_path / RUN) == list(range(5, 41, 5))


def test_ctrl_c_says_where_the_run_stands_and_how_to_resume(tmp_path):
    proc = spawn(*train_args(tmp_path, steps=200_000))
    wait_for(lambda: (tmp_path / RUN / "checkpoint.pt").exists(), proc)
    os.kill(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    line = last_line(err)
    assert "Traceback" not in err and line.startswith("mcsae: interrupted"), err[-3000:]
    assert "--resume" in line and "step" in line, line
    assert str(tmp_path / RUN / "checkpoint.pt") in line, line  # names the file the resume continues from


# ------------------------------------------------------------------------ validation and one-line errors
TRAIN_BAD = [("--grad-clip", "-1", "grad_clip"), ("--dead-tokens", "-5", "dead_tokens"), ("--autocast", "flase", "autocast"),
             ("--k", "4.5", "k"), ("--log-every", "0", "log_every"), ("--warmup-steps", "-1", "warmup_steps"),
             ("--decay-frac", "1.5", "decay_frac"), ("--lr", "-0.1", "lr"), ("--checkpoint-every", "-1", "checkpoint_every"),
             ("--n-features", "0", "n_features"), ("--batch-size", "0", "batch_size"), ("--aux-alpha", "-1", "aux_alpha"),
             ("--zipf-s", "-1", "zipf_s"), ("--rank-every", "0", "rank_every"), ("--b-dec-init", "median", "b_dec_init"),
             ("--k-aux", "0", "k_aux"), ("--adam-eps", "-1", "adam_eps"), ("--n-tokens", "10", "n_tokens"),
             ("--kind", "topq", "kind"), ("--aux", "aux_q", "aux"), ("--seed", "1.5", "seed"), ("--name", "../up", "name"),
             ("--encoder-init", "orthogonal", "encoder_init"), ("--outlier-norm", "0.5", "outlier_norm"),
             ("--outlier-action", "normalize", "outlier_action")]


@pytest.mark.parametrize("option,value,field", TRAIN_BAD, ids=[f"{o}={v}" for o, v, _ in TRAIN_BAD])
def test_bad_train_option_is_a_one_line_error(tmp_path, capsys, option, value, field):
    code, _, err = run_main(capsys, *train_args(tmp_path / "out", option, value))
    assert_user_error(code, err, field)
    assert not (tmp_path / "out").exists()  # refused before any work


CACHE_BAD = [("--context-length", "1", "context_length"), ("--hook", "7", "hook"), ("--eval-fraction", "1.5", "eval_fraction"),
             ("--eval-fraction", "-0.1", "eval_fraction"), ("--n-tokens", "-5", "n_tokens"),
             ("--model-batch-size", "0", "model_batch_size"), ("--buffer-size", "10", "buffer_size"),
             ("--dtype", "float8", "dtype"), ("--streaming", "maybe", "streaming"), ("--batch-size", "2.5", "batch_size")]


@pytest.mark.parametrize("option,value,field", CACHE_BAD, ids=[f"{o}={v}" for o, v, _ in CACHE_BAD])
def test_bad_cache_option_is_a_one_line_error(tmp_path, capsys, option, value, field):
    args = {"--model": MODEL, "--hook": "1", "--corpus": CORPUS, "--context-length": "32", "--n-tokens": "1000", option: value}
    code, _, err = run_main(capsys, "cache", "--out", tmp_path / "c", *[x for kv in args.items() for x in kv])
    assert_user_error(code, err, field)
    assert not (tmp_path / "c").exists() and hidden(tmp_path) == []


@pytest.mark.parametrize("option,value", [("--eval-tokens", "-5"), ("--downstream-contexts", "-3"), ("--eval-tokens", "0")])
def test_bad_evaluate_option_is_a_one_line_error(tmp_path, capsys, option, value):
    code, _, err = run_main(capsys, *train_args(tmp_path))
    assert code == 0, err[-3000:]
    code, _, err = run_main(capsys, "evaluate", tmp_path / RUN, "--cache", CACHE, option, value)
    assert_user_error(code, err, option.lstrip("-").replace("-", "_"))


# Every field of every config dataclass, with the bad values tried on it: a validated field refuses one of them with a
# UserError naming ConfigClass.field and its --option. The fields below accept any value of their type, on purpose.
FREE_FIELDS: dict[tuple[str, str], str] = {}  # (class, field) -> why it takes any value; none so far
BAD_VALUES = (-1, 0, 1.5, float("nan"), float("inf"), "bogus", "", True, None, "../up", 10**12)


def _config_classes():
    from mcsae.dashboard import DashboardConfig
    from mcsae.models import ActivationConfig
    from mcsae.sae import SAEConfig
    from mcsae.trainer import TrainConfig
    required = {SAEConfig: dict(d_in=16, n_features=32, k=4)}  # the fields without defaults
    return [(cls, required.get(cls, {})) for cls in (ActivationConfig, SAEConfig, TrainConfig, DashboardConfig)]


def _refusal(cls, base: dict, name: str):
    "(bad value, message) of the first BAD_VALUES entry cls refuses for field name, or None if it takes them all."
    from mcsae.io import UserError
    for bad in BAD_VALUES:
        try:
            cls(**{**base, name: bad})
        except UserError as e:
            return bad, str(e)
    return None


CONFIG_FIELDS = [(cls, base, f.name) for cls, base in _config_classes() for f in dataclasses.fields(cls)]


@pytest.mark.parametrize("cls,base,name", CONFIG_FIELDS, ids=[f"{c.__name__}.{n}" for c, _, n in CONFIG_FIELDS])
def test_api_validates_like_the_cli(cls, base, name, capsys, tmp_path):
    "Each config field refuses a bad value in the API with a one-line UserError naming it; the CLI says the same line."
    found = _refusal(cls, base, name)
    if (cls.__name__, name) in FREE_FIELDS:
        assert found is None, f"{cls.__name__}.{name} is validated now: drop it from FREE_FIELDS"
        return
    assert found is not None, f"{cls.__name__}.{name} accepts every one of {BAD_VALUES}: validate it (check_field)"
    bad, message = found
    option = f"--{name.replace('_', '-')}"
    assert "\n" not in message and re.search(rf"\b\w+Config\.{name} \({option}\)", message), message
    if cls.__name__ == "SAEConfig" or bad in (None, True) or isinstance(bad, float) and bad != bad:
        return  # not options of their own (TrainConfig sets them), or values a command line cannot spell as such
    text = {float("inf"): "inf"}.get(bad, str(bad))
    if cls.__name__ == "DashboardConfig":
        args = ["dashboard", tmp_path / "run", "--cache", CACHE, "--out", tmp_path / "site", option, text]
    elif cls.__name__ == "ActivationConfig":
        args = ["cache", "--model", MODEL, "--hook", 1, "--corpus", CORPUS, "--context-length", 32, "--n-tokens", 1000,
                "--out", tmp_path / "c", option, text]
    else:
        args = train_args(tmp_path / "out", option, text)
    code, _, err = run_main(capsys, *args)
    line = assert_user_error(code, err, f"{name} ({option})")
    same = line.replace(repr(text), repr(bad))  # the command line may pass the value as text ('-1' for -1)
    assert f"mcsae: error: {message}" in (line, same), line  # the same rule, word for word
    assert not (tmp_path / "out").exists() and not (tmp_path / "c").exists() and not (tmp_path / "site").exists()


def test_errors_from_the_installed_command_have_no_traceback(tmp_path):
    command = [shutil.which("mcsae")] if shutil.which("mcsae") else ENTRY  # the console script, where installed
    args = [str(a) for a in train_args(tmp_path / "out", "--k", "4.5")]
    res = subprocess.run(command + args, env=_env(), capture_output=True, text=True, timeout=300)
    assert_user_error(res.returncode, res.stderr, "k")
    res = cli("evaluate", tmp_path / "nowhere", "--cache", CACHE)
    assert_user_error(res.returncode, res.stderr, "nowhere")


def test_non_utf8_corpus_is_a_one_line_error(tmp_path, capsys):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("Caf\xe9 cr\xe8me br\xfbl\xe9e. ".encode("latin-1") * 200)
    code, _, err = run_main(capsys, "cache", "--model", MODEL, "--hook", 1, "--corpus", bad, "--context-length", 32,
                            "--n-tokens", 500, "--out", tmp_path / "c")
    assert_user_error(code, err, "utf-8", "latin1.txt")
    assert not (tmp_path / "c").exists()


def test_corpus_too_short_for_one_context_is_a_one_line_error(tmp_path, capsys):
    small = tmp_path / "small.txt"
    small.write_text("Too short.")
    code, _, err = run_main(capsys, "cache", "--model", MODEL, "--hook", 1, "--corpus", small, "--context-length", 32,
                            "--n-tokens", 500, "--out", tmp_path / "c")
    assert_user_error(code, err, "small.txt", "32", "--context-length")
    assert not (tmp_path / "c").exists() and hidden(tmp_path) == []


def test_context_longer_than_the_model_reads_is_a_one_line_error(tmp_path, capsys):
    "The tiny model reads 64 positions: --context-length 65 is refused naming the limit, not an IndexError."
    source = ["--model", MODEL, "--hook", 1, "--corpus", CORPUS, "--context-length", 65]
    for args in (["cache", "--out", tmp_path / "c", "--n-tokens", 500, *source],
                 ["train", "--out", tmp_path / "t", *source, "--n-features", 32, "--k", 4, "--batch-size", 64,
                  "--n-tokens", 640],
                 ["train", "--stream", "--out", tmp_path / "s", *source, "--n-features", 32, "--k", 4, "--batch-size",
                  64, "--n-tokens", 640]):
        code, _, err = run_main(capsys, *args)
        assert_user_error(code, err, "65", "--context-length 64 or less")
    assert list(tmp_path.iterdir()) == []


def test_plain_value_errors_do_not_reach_the_user():
    "The functions the commands call raise UserError, not ValueError, for what a user can cause."
    from mcsae.corpora import pack_documents
    from mcsae.hooks import transformer_blocks
    from mcsae.io import UserError
    from mcsae.store import shuffle_batches
    from tiny import char_tokenizer
    with pytest.raises(UserError, match="--context-length"):
        pack_documents(["ab"], char_tokenizer(), 8)
    with pytest.raises(UserError, match="--hook"):
        model = torch.nn.Linear(2, 2)
        model.config = tiny_model(n_layer=2, d_model=16, n_head=2)[0].config  # says 2 blocks, holds none
        transformer_blocks(model)
    with pytest.raises(UserError, match="buffer_size"):
        next(shuffle_batches([torch.zeros(4, 2)], 4, 4))


def test_hub_dataset_while_offline_is_a_one_line_error(tmp_path):
    res = cli("cache", "--model", MODEL, "--hook", 1, "--corpus", "mcsae-test/no-such-dataset", "--context-length", 32,
              "--n-tokens", 500, "--out", tmp_path / "c", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    assert_user_error(res.returncode, res.stderr, "mcsae-test/no-such-dataset")
    assert not (tmp_path / "c").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_device_cuda_without_a_gpu_is_a_one_line_error(tmp_path, capsys):
    code, _, err = run_main(capsys, *train_args(tmp_path / "out", "--device", "cuda"))
    assert_user_error(code, err, "cuda")
    assert not (tmp_path / "out").exists()


def test_unwritable_out_is_refused_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    code, _, err = run_main(capsys, *train_args(blocker / "runs"))
    assert_user_error(code, err, str(blocker))
    # checked before the model is even looked at: the error is about --out, not the missing model
    code, _, err = run_main(capsys, "train", "--out", blocker / "runs", "--model", tmp_path / "no-model", "--n-tokens", 640,
                            "--batch-size", 64, "--n-features", 32, "--k", 4)
    assert_user_error(code, err, str(blocker))
    code, _, err = run_main(capsys, "cache", "--out", blocker / "c", "--model", tmp_path / "no-model")
    assert_user_error(code, err, str(blocker))
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        code, _, err = run_main(capsys, *train_args(ro))
        assert_user_error(code, err, str(ro))


def test_disk_full_is_named(tmp_path, capsys, monkeypatch):
    real_save = torch.save

    def full(obj, f, *a, **k):
        real_save(obj, f, *a, **k)  # the temporary file is written, then the disk fills up
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full)
    code, _, err = run_main(capsys, *train_args(tmp_path))
    assert_user_error(code, err, "space")
    assert temporaries(tmp_path) == []


def test_torn_metrics_line_is_repaired_on_resume(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MCSAE_FAULT", f"checkpoint:{RUN}:20=INT")  # Ctrl-C in this very process
    code, _, err = run_main(capsys, *train_args(tmp_path))
    assert code == 130, err[-3000:]
    monkeypatch.delenv("MCSAE_FAULT")
    with open(tmp_path / RUN / "metrics.jsonl", "a") as f:
        f.write('{"step": 25, "tokens": 16')  # a write cut by a crash
    code, _, err = run_main(capsys, *train_args(tmp_path, "--resume"))
    assert code == 0, err[-3000:]
    assert steps_logged(tmp_path / RUN) == list(range(5, 41, 5))


def test_corrupt_feature_stats_is_a_one_line_error(tmp_path, capsys):
    code, _, err = run_main(capsys, *train_args(tmp_path))
    assert code == 0, err[-3000:]
    (tmp_path / RUN / "feature_stats.pt").write_bytes(b"PK\x03\x04 not really a zip")
    code, _, err = run_main(capsys, "evaluate", tmp_path / RUN, "--cache", CACHE, "--downstream-contexts", 0)
    assert_user_error(code, err, "feature_stats.pt")


# ------------------------------------------------------------------------------------------ leftovers
def test_killed_writes_leave_leftovers_that_the_next_run_cleans(tmp_path, capsys):
    kill = cli(*train_args(tmp_path), MCSAE_FAULT="write:sae.safetensors")
    assert kill.returncode == -signal.SIGKILL, kill.stderr[-2000:]
    run = tmp_path / RUN
    left = hidden(run)
    assert left and all(n.startswith(".sae.safetensors.tmp-") for n in left), left  # hidden: never matched by later reads
    assert not (run / "sae.safetensors").exists()
    code, _, err = run_main(capsys, *train_args(tmp_path, "--resume"))
    assert code == 0, err[-3000:]
    assert (run / "sae.safetensors").exists() and temporaries(tmp_path) == []

    cache_args = ["cache", "--model", MODEL, "--hook", 1, "--corpus", CORPUS, "--context-length", 32, "--n-tokens", 1000,
                  "--out", tmp_path / "c"]
    kill = cli(*cache_args, MCSAE_FAULT="shard:0")
    assert kill.returncode == -signal.SIGKILL, kill.stderr[-2000:]
    assert not (tmp_path / "c").exists() and [n for n in hidden(tmp_path) if n.startswith(".c.")]
    code, _, err = run_main(capsys, *cache_args)
    assert code == 0, err[-3000:]
    assert not [n for n in hidden(tmp_path) if n.startswith(".c.")] and temporaries(tmp_path) == []


# ------------------------------------------------------------------------------ file modes and fsync
def test_file_modes_follow_the_umask(tmp_path, capsys):
    old = os.umask(0o027)
    try:
        code, _, err = run_main(capsys, *train_args(tmp_path))
    finally:
        os.umask(old)
    assert code == 0, err[-3000:]
    for root in (Path(CACHE), tmp_path):  # the cache was built under umask 027 too (module fixture)
        for p in root.rglob("*"):
            if p.name.endswith(".lock"):
                continue
            mode = p.stat().st_mode & 0o777
            assert mode == (0o750 if p.is_dir() else 0o640), (p, oct(mode))


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name file descriptors")
def test_atomic_writes_fsync_the_file_and_its_folder(tmp_path, capsys, monkeypatch):
    synced, renamed = [], []
    real_fsync, real_replace, real_rename = os.fsync, os.replace, os.rename

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    def replace(src, dst, *a, **k):
        renamed.append((str(src), str(dst), len(synced)))
        return real_replace(src, dst, *a, **k)

    def rename(src, dst, *a, **k):
        renamed.append((str(src), str(dst), len(synced)))
        return real_rename(src, dst, *a, **k)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "rename", rename)
    code, _, err = run_main(capsys, *train_args(tmp_path))
    assert code == 0, err[-3000:]
    finals = {Path(d).name for _, d, _ in renamed}
    assert {"checkpoint.pt", "sae.safetensors", "feature_stats.pt"} <= finals
    for src, dst, n_before in renamed:
        if Path(src).is_dir() or Path(dst).is_dir():
            continue
        assert os.path.realpath(src) in synced[:n_before], (src, "not fsynced before its rename")
        assert os.path.realpath(Path(dst).parent) in synced[n_before:], (dst, "folder not fsynced after the rename")


def test_missing_optional_package_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    "Without transformers (the lm extra), `mcsae cache` says what to pip install, in one line."
    import importlib

    import mcsae.io
    real = importlib.import_module

    def no_transformers(name, *a, **k):
        if name == "transformers":
            raise ImportError("No module named 'transformers'")
        return real(name, *a, **k)

    monkeypatch.setattr(mcsae.io.importlib, "import_module", no_transformers)
    code, _, err = run_main(capsys, "cache", "--model", MODEL, "--hook", 1, "--corpus", CORPUS, "--context-length", 32,
                            "--n-tokens", 500, "--out", tmp_path / "c")
    assert_user_error(code, err, "transformers", 'pip install "mcsae[lm]"')
    assert not (tmp_path / "c").exists() and hidden(tmp_path) == []


def test_local_model_and_corpus_paths_are_the_same_from_any_folder(tmp_path, capsys, monkeypatch):
    "A cache built with `--model ./tiny --corpus ./text.txt` records absolute paths: another spelling of the same files is no "
    "conflict, and later commands run from any folder find them."
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    shutil.copytree(MODEL, work / "tiny")
    (work / "text.txt").write_text("In the beginning was the word, and the word was with the text. " * 200)
    elsewhere.mkdir()
    monkeypatch.chdir(work)
    code, _, err = run_main(capsys, "cache", "--model", "./tiny", "--hook", "1", "--corpus", "text.txt", "--context-length",
                            32, "--n-tokens", 3000, "--eval-fraction", 0.2, "--out", "acts")
    assert code == 0, err[-2000:]
    built = json.loads((work / "acts" / "manifest.json").read_text())["config"]
    assert built["model"] == str(work / "tiny") and built["corpus"] == str(work / "text.txt")
    monkeypatch.chdir(elsewhere)  # the same model by its absolute path, from another folder: accepted
    code, out, err = run_main(capsys, *train_args(elsewhere / "runs", "--model", work / "tiny", "--corpus",
                                                  work / "text.txt", cache=work / "acts", steps=10))
    assert code == 0, err[-2000:]
    code, out, err = run_main(capsys, "evaluate", out.strip().splitlines()[-1], "--cache", work / "acts",
                              "--downstream-contexts", 2)  # loads the model the cache names, from this other folder
    assert code == 0 and "Traceback" not in err, err[-2000:]
    code, _, err = run_main(capsys, *train_args(elsewhere / "other", "--model", MODEL, cache=work / "acts", steps=10))
    assert_user_error(code, err, "--model")  # another model (another folder) is still a conflict


def test_evaluate_of_a_file_writes_beside_it_and_never_over_the_runs_own(tmp_path, capsys):
    "`mcsae evaluate RUN/other.safetensors` writes RUN/other.eval.json; RUN/eval.json (the run's own SAE) is untouched."
    code, out, err = run_main(capsys, *train_args(tmp_path, steps=10))
    assert code == 0, err[-2000:]
    run = Path(out.strip().splitlines()[-1]).parent
    code, _, err = run_main(capsys, "evaluate", run, "--cache", CACHE, "--downstream-contexts", 0)
    assert code == 0, err[-2000:]
    own = (run / "eval.json").read_bytes()
    shutil.copy(run / "sae.safetensors", run / "other.safetensors")
    code, _, err = run_main(capsys, "evaluate", run / "other.safetensors", "--cache", CACHE, "--downstream-contexts", 0)
    assert code == 0, err[-2000:]
    assert (run / "eval.json").read_bytes() == own
    res = json.loads((run / "other.eval.json").read_text())
    assert "dead_frac_train" in json.loads(own)  # the run's own evaluation has its training statistics
    assert res["run"] == str(run / "other.safetensors") and "dead_frac_train" not in res  # not the run's
    code, _, err = run_main(capsys, "evaluate", run / "typo.safetensors", "--cache", CACHE)
    assert_user_error(code, err, "typo.safetensors")
    assert "typo.safetensors/sae.safetensors" not in err


def test_provenance_compares_local_paths_as_folders(tmp_path, monkeypatch):
    "A model recorded by a relative path (older files) and the same folder given absolute are one model; others differ."
    from mcsae.store import provenance_mismatch

    (tmp_path / "tiny").mkdir()
    (tmp_path / "other").mkdir()
    monkeypatch.chdir(tmp_path)
    assert provenance_mismatch({"model": "tiny", "hook": "blocks.1"}, {"model": str(tmp_path / "tiny"), "hook": "blocks.1"}) == ""
    assert "model" in provenance_mismatch({"model": "tiny"}, {"model": str(tmp_path / "other")})
    assert "model" in provenance_mismatch({"model": "gpt2"}, {"model": "gpt2-medium"})  # hub names: compared as names


def test_a_cache_run_does_not_resume_on_a_stream(tmp_path):
    "A checkpoint that records no stream shares (a cache's run) is not resumed from a --stream source."
    from mcsae.trainer import TrainConfig, Trainer, read_checkpoint

    cfg = TrainConfig(n_features=32, k=4, batch_size=64, n_tokens=640)
    t = Trainer(cfg, 16, tmp_path, provenance={"model": MODEL, "hook": "blocks.1"})
    t.initialize(torch.randn(64, 16))
    t.save_checkpoint()
    read_checkpoint(t.checkpoint_path, cfg, {"model": MODEL, "hook": "blocks.1", "d_model": 16})  # from a cache: fine
    from mcsae.io import UserError
    with pytest.raises(UserError, match="stream"):
        read_checkpoint(t.checkpoint_path, cfg, {"model": MODEL, "hook": "blocks.1", "d_model": 16, "stream_processes": 2})
