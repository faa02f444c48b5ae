"""Can this model learn in-context retrieval? A two-minute CPU probe on a synthetic key-value stream.

    python -m launch.recall_probe [--core nope|polar|rope] [--no-memory] [--seed 0] [--steps 600]

A two-block ATMA (one LFM2 conv block, one global block with the gated-delta memory; hidden 64,
head_dim 64) trains on sequences of random filler tokens in which facts ``EQ k d1 d2 d3 d4 d5 DOT``
(16 single-token keys, each used once per sequence) are later queried as ``CUE k d1 ... d5 DOT``;
the loss is the cross-entropy of the queried value digits only. Values have one digit for the first
``--curriculum-steps`` steps, then five. The metric is the teacher-forced token accuracy on the five
value digits of every query in 128 held-out sequences (chance: 10%).

This is the easiest setting in which these models learn retrieval on a CPU; see docs/results.md
for what it took (value-only loss, a narrow model, the digit curriculum) and what did not learn.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model import AtmaConfig, AtmaForCausalLM

# Token ids: four markers, ten digits, the keys, then the filler tokens.
BOS, CUE, EQ, DOT, FIRST_DIGIT = 0, 1, 2, 3, 4
FIRST_KEY, NUM_KEYS, NUM_FILLERS = 14, 16, 16
FIRST_FILLER = FIRST_KEY + NUM_KEYS
VOCAB_SIZE = 48
NUM_DIGITS = 5
CHANCE = 0.1


@dataclass(frozen=True)
class ProbeSettings:
    """The probe's training recipe."""

    core: str = "nope"
    memory: bool = True
    seed: int = 0
    steps: int = 600
    curriculum_steps: int = 250
    seq_len: int = 64
    batch_size: int = 32
    lr: float = 3e-3
    warmup_steps: int = 50
    target: float = 0.5
    eval_every: int = 25


def sequence(gen: torch.Generator, seq_len: int, digits: int, filler=(0, 2), p_fact: float = 0.5):
    """One sequence of ``seq_len + 1`` ids and its mask of queried value digits."""
    def draw(low: int, high: int) -> int:
        return int(torch.randint(low, high + 1, (1,), generator=gen))

    ids, mask, facts = [BOS], [0], []
    keys = torch.randperm(NUM_KEYS, generator=gen).tolist()
    while len(ids) < seq_len + 1:
        count = draw(*filler)
        ids += (FIRST_FILLER + torch.randint(0, NUM_FILLERS, (count,), generator=gen)).tolist()
        mask += [0] * count
        if keys and (not facts or float(torch.rand(1, generator=gen)) < p_fact):
            key = FIRST_KEY + keys.pop()
            value = (FIRST_DIGIT + torch.randint(0, 10, (digits,), generator=gen)).tolist()
            facts.append((key, value))
            ids += [EQ, key, *value, DOT]
            mask += [0] * (digits + 3)
        else:
            key, value = facts[draw(0, len(facts) - 1)]
            ids += [CUE, key, *value, DOT]
            mask += [0, 0] + [1] * len(value) + [0]
    return ids[: seq_len + 1], mask[: seq_len + 1]


def batch(gen: torch.Generator, size: int, seq_len: int, digits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``size`` sequences: ids (size, seq_len + 1) and the boolean mask of queried value digits."""
    rows = [sequence(gen, seq_len, digits) for _ in range(size)]
    return torch.tensor([r[0] for r in rows]), torch.tensor([r[1] for r in rows]).bool()


def probe_model(settings: ProbeSettings) -> AtmaForCausalLM:
    """The probe's model: layout [conv, global], hidden 64, two heads of 64."""
    config = AtmaConfig.from_preset(
        "tiny", vocab_size=VOCAB_SIZE, core=settings.core, memory=settings.memory, hidden_size=64,
        num_hidden_layers=2, global_every=2, global_offset=1, head_dim=64, num_attention_heads=2,
        num_key_value_heads=2)
    return AtmaForCausalLM(config)


def value_accuracy(model: AtmaForCausalLM, ids: torch.Tensor, mask: torch.Tensor) -> float:
    """Teacher-forced token accuracy on the masked value digits."""
    model.eval()
    with torch.no_grad():
        predicted = model.logits(model.trunk(ids[:, :-1])[0]).argmax(-1)
    model.train()
    targets = mask[:, 1:]
    return (predicted[targets] == ids[:, 1:][targets]).float().mean().item()


def run_probe(settings: ProbeSettings, log=None) -> dict:
    """Train until the held-out value accuracy reaches ``settings.target`` or the steps run out."""
    torch.manual_seed(settings.seed)
    model = probe_model(settings)
    matrices = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    others = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW([{"params": matrices, "weight_decay": 0.1}, {"params": others, "weight_decay": 0.0}],
                                  lr=settings.lr, betas=(0.9, 0.95))

    def lr_at(step: int) -> float:  # linear warmup, cosine to 10% at the last step
        if step < settings.warmup_steps:
            return settings.lr * (step + 1) / settings.warmup_steps
        progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
        return settings.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))

    gen = torch.Generator().manual_seed(1000 + settings.seed)
    held_out = batch(torch.Generator().manual_seed(123), 128, settings.seq_len, NUM_DIGITS)
    start, accuracy, history, step = time.process_time(), 0.0, [], 0
    for step in range(1, settings.steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step - 1)
        digits = 1 if step <= settings.curriculum_steps else NUM_DIGITS
        ids, mask = batch(gen, settings.batch_size, settings.seq_len, digits)
        logits = model.logits(model.trunk(ids[:, :-1])[0])
        targets = mask[:, 1:]
        loss = F.cross_entropy(logits[targets], ids[:, 1:][targets])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % settings.eval_every == 0 and step > settings.curriculum_steps:
            accuracy = value_accuracy(model, *held_out)
            history.append({"step": step, "accuracy": accuracy, "cpu_s": time.process_time() - start})
            if log is not None:
                log(history[-1])
            if accuracy >= settings.target:
                break
    return {"core": settings.core, "memory": settings.memory, "seed": settings.seed, "steps": step,
            "accuracy": accuracy, "passed": accuracy >= settings.target, "chance": CHANCE,
            "cpu_s": time.process_time() - start, "history": history}


def main(argv=None) -> int:
    """Command-line entry point: exit 0 when the target accuracy is reached, 1 otherwise."""
    p = argparse.ArgumentParser(prog="python -m launch.recall_probe", description=__doc__.split("\n\n")[0])
    p.add_argument("--core", choices=("nope", "polar", "rope"), default="nope",
                   help="attention core of the global blocks (default: nope)")
    p.add_argument("--no-memory", action="store_true", help="global blocks without the gated-delta memory")
    p.add_argument("--seed", type=int, default=0, help="seed of the model's init and the training episodes (default: 0)")
    p.add_argument("--steps", type=int, default=600, help="most optimizer steps (default: 600)")
    p.add_argument("--curriculum-steps", type=int, default=250, help="steps with one-digit values first (default: 250)")
    p.add_argument("--target", type=float, default=0.5, help="stop at this value accuracy (default: 0.5)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = ProbeSettings(core=args.core, memory=not args.no_memory, seed=args.seed, steps=args.steps,
                             curriculum_steps=args.curriculum_steps, target=args.target)
    result = run_probe(settings, log=lambda row: print(
        f"step {row['step']}: value accuracy {100 * row['accuracy']:.1f}% ({row['cpu_s']:.0f} CPU s)", flush=True))
    print(json.dumps({k: v for k, v in result.items() if k != "history"}), flush=True)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
