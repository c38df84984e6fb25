"""The core install: mcsae.sae, .allocation, .losses and .train import and train without the extras
(transformers, datasets, gguf, accelerate, papermill, matplotlib), and what needs an extra says which."""
import subprocess
import sys

import pytest

BLOCK = ("transformers", "datasets", "gguf", "accelerate", "papermill", "matplotlib", "nbdev", "tokenizers")
PRELUDE = ("import sys\n"
           f"for name in {BLOCK!r}:\n"
           "    sys.modules[name] = None  # import of it raises ImportError, as if not installed\n")


def run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PRELUDE + code], capture_output=True, text=True, timeout=300)


def test_core_trains_without_extras():
    proc = run("import torch\n"
               "from mcsae.train import TensorSource, TrainConfig, train\n"
               "import mcsae.allocation, mcsae.losses, mcsae.sae, mcsae.io\n"
               "import tempfile\n"
               "cfg = TrainConfig(kind='feature_choice', n_features=64, k=4, n_tokens=512, batch_size=128, checkpoint_every=0)\n"
               "with tempfile.TemporaryDirectory() as d:\n"
               "    train(cfg, TensorSource(torch.randn(1024, 16)), d, progress=False)\n"
               "print('ok')\n")
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


@pytest.mark.parametrize("code, extra", [
    ("from mcsae.models import load_model\nload_model('gpt2')", "lm"),
    ("from mcsae.corpora import load_documents\nload_documents('someone/some_dataset')", "lm"),
    ("import mcsae.plots", "reproduce"),
    ("from mcsae.reproduce import run_notebook\nrun_notebook('x', {}, '.', '.')", "reproduce"),
])
def test_a_missing_extra_is_named_in_one_line(code, extra):
    proc = run(code)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode != 0 and last.startswith("mcsae.io.MissingDependency: "), proc.stderr[-2000:]  # an ImportError
    assert f'pip install "mcsae[{extra}]"' in last, proc.stderr[-2000:]
