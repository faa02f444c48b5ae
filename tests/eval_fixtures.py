"""Helpers shared by the evaluation tests: a real exported tiny model and its export.json."""

from __future__ import annotations

import hashlib
import json
import os

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from model import AtmaConfig, AtmaForCausalLM

EOS = "<|endoftext|>"


def write_export_info(directory: str, **fields) -> dict:
    """export.json as an export writes it: training seq_len, tokens seen, provenance and each
    weights file's sha256 (``fields`` replace or add keys)."""
    sums = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            with open(os.path.join(directory, name), "rb") as f:
                sums[name] = hashlib.sha256(f.read()).hexdigest()
    info = {"step": 100, "seq_len": 64, "tokens_seen": 409600, "provenance": {"git_commit": "0" * 40},
            "weights_sha256": sums, **fields}
    with open(os.path.join(directory, "export.json"), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2)
    return info


def export_tiny_model(directory: str, corpus: list[str], vocab_size: int = 512) -> str:
    """A random tiny model with a byte-level BPE trained on ``corpus``, saved as an export would be.

    The default init zeroes output projections; those get weights too, so that context matters.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(corpus, trainer)
    torch.manual_seed(0)
    model = AtmaForCausalLM(AtmaConfig.from_preset("tiny", vocab_size=tokenizer.get_vocab_size()))
    with torch.no_grad():
        for p in model.parameters():
            if torch.count_nonzero(p) == 0:
                p.normal_(0.0, 0.05)
    model.save_pretrained(directory)
    tokenizer.save(os.path.join(directory, "tokenizer.json"))
    write_export_info(directory)
    return directory
