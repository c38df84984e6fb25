"""Offline test fixtures shared by tests/ and the notebooks' test cells: a character-level tokenizer and a
randomly initialised tiny GPT-2 (no download). Not part of the library."""
from typing import Any

import torch
from torch import nn


def char_tokenizer() -> Any:
    "An offline character-level tokenizer: printable ASCII and newline, with <bos>=0, <eos>=1, <unk>=2."
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    vocab = {"<bos>": 0, "<eos>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>")


def tiny_model(n_layer: int = 2, d_model: int = 32, n_head: int = 4, n_positions: int = 256, seed: int = 0) -> tuple[nn.Module, Any]:
    "A randomly initialised tiny GPT-2 with the character tokenizer, for tests (no download)."
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = char_tokenizer()
    config = GPT2Config(vocab_size=len(tok), n_positions=n_positions, n_embd=d_model, n_layer=n_layer, n_head=n_head,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config).eval().requires_grad_(False)
    return model, tok
