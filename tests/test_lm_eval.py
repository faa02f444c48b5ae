"""lm-evaluation-harness on an exported model, offline, with the `hf` backend and trust_remote_code.

Two tiny local tasks shipped in tests/assets/lm_eval (a multiple-choice and a LAMBADA-style
loglikelihood task, as lm-eval task YAMLs over JSON lines) run through the `lm_eval` command with
the hub and datasets offline. The scores must be numbers in range, and every loglikelihood
lm-eval recorded must equal the one this project's model gives for the same request.
"""

import glob
import json
import math
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("lm_eval", reason="the lm-evaluation-harness test needs requirements-eval.txt")

from tokenizers import Tokenizer  # noqa: E402

from model import AtmaConfig, AtmaForCausalLM  # noqa: E402
from pretrain.hf_export import write_transformers_files  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS_DIR = os.path.join(ROOT, "tests", "assets", "lm_eval")
TASKS = ("atma_tiny_choice", "atma_tiny_cloze")


def exported_model(directory, tokenizer_path) -> AtmaForCausalLM:
    torch.manual_seed(0)
    model = AtmaForCausalLM(AtmaConfig.from_preset("tiny", vocab_size=512)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if torch.count_nonzero(p) == 0:
                p.normal_(0, 0.1)
    model.save_pretrained(directory)
    with open(tokenizer_path, encoding="utf-8") as src, open(os.path.join(directory, "tokenizer.json"), "w") as dst:
        dst.write(src.read())
    write_transformers_files(directory)
    return model


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split of a request into context and continuation tokens (trailing spaces move over)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation).ids
    context_ids = tokenizer.encode(context).ids
    return context_ids, whole[len(context_ids):]


def loglikelihood(model, context_ids, continuation_ids) -> float:
    ids = torch.tensor([context_ids + continuation_ids[:-1]])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
    positions = range(len(context_ids) - 1, len(context_ids) - 1 + len(continuation_ids))
    return sum(logp[p, t].item() for p, t in zip(positions, continuation_ids))


def test_lm_eval_scores_the_exported_model_offline(tiny_shards, tmp_path):
    directory = str(tmp_path / "model")
    tokenizer_path = os.path.join(tiny_shards, "tokenizer.json")
    model = exported_model(directory, tokenizer_path)
    out = tmp_path / "lm_eval"
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf",
           "--model_args", f"pretrained={directory},trust_remote_code=True",
           "--tasks", ",".join(TASKS), "--include_path", TASKS_DIR, "--device", "cpu", "--batch_size", "2",
           "--output_path", str(out), "--log_samples"]
    # The task YAMLs name their JSON lines relative to their own directory.
    proc = subprocess.run(cmd, cwd=TASKS_DIR, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]

    (results_path,) = glob.glob(str(out / "**" / "results_*.json"), recursive=True)
    with open(results_path, encoding="utf-8") as f:
        results = json.load(f)["results"]
    choice, cloze = results["atma_tiny_choice"], results["atma_tiny_cloze"]
    for value in (choice["acc,none"], choice["acc_norm,none"], cloze["acc,none"]):
        assert isinstance(value, float) and 0.0 <= value <= 1.0
    assert math.isfinite(cloze["perplexity,none"]) and cloze["perplexity,none"] >= 1.0

    # Every request's loglikelihood equals the project's model on the same tokens.
    tokenizer = Tokenizer.from_file(tokenizer_path)
    checked = 0
    for task in TASKS:
        (samples_path,) = glob.glob(str(out / "**" / f"samples_{task}_*.jsonl"), recursive=True)
        with open(samples_path, encoding="utf-8") as f:
            samples = [json.loads(line) for line in f]
        assert len(samples) == {"atma_tiny_choice": 4, "atma_tiny_cloze": 5}[task]
        for sample in samples:
            for request, response in zip(sample["arguments"].values(), sample["resps"]):
                context_ids, continuation_ids = encode_pair(tokenizer, request["arg_0"], request["arg_1"])
                expected = loglikelihood(model, context_ids, continuation_ids)
                # The samples file stores the numbers as text.
                assert float(response[0][0]) == pytest.approx(expected, abs=1e-4), (task, request)
                checked += 1
    assert checked == 4 * 4 + 5
