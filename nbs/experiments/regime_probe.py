"""Probe for the regime study: 12,288 activations of SmolLM2-135M block 8 (corpus shuffle seed 1) -> runs/regime/probe.pt."""
import torch

from mcsae.corpora import corpus_tokens, keep_mask
from mcsae.hooks import iter_activations
from mcsae.models import ActivationConfig, load_model

torch.set_num_threads(1)
cfg = ActivationConfig(hook=8, n_tokens=12288, seed=1)
model, tok = load_model(cfg.model)
tokens = corpus_tokens(cfg, tok)
keep = keep_mask(tokens, tok)
acts = torch.cat(list(iter_activations(model, tokens, 8, 16, keep)))
print(acts.shape)
torch.save(acts, "runs/regime/probe.pt")
