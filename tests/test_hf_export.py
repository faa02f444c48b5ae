"""The exported model in Hugging Face `transformers`: loading, logits, generate() and the shipped code.

Every core (polar, nope, rope) with and without memory and a window, random weights (every
zero-initialised tensor given values): `AutoModelForCausalLM.from_pretrained(dir,
trust_remote_code=True)` gives the project's logits (fp32, 1e-5), `generate()` the project's
cached greedy tokens, and the same directory still loads with `model.AtmaForCausalLM`.
"""

import ast
import dataclasses
import inspect
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the transformers tests need requirements-eval.txt")

from helpers import live_model  # noqa: E402

from model import AtmaConfig, AtmaForCausalLM  # noqa: E402
from model.generation import greedy_generate  # noqa: E402
from model.hf import SHIPPED_FILES, TRANSFORMERS_CONFIG_KEYS, shipped_path  # noqa: E402
from model.hf import configuration_atma as hf_configuration  # noqa: E402
from pretrain.hf_export import write_transformers_files  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = [(core, memory, window) for core in ("polar", "nope", "rope") for memory in (True, False) for window in (None, 5)]
IDS = [f"{c}-mem{int(m)}-W{w}" for c, m, w in CASES]


@pytest.fixture(autouse=True)
def _offline_hub(tmp_path, monkeypatch):
    """Keep transformers' module cache inside the test's directory and off the network."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")




def exported(model, directory, tokenizer=None) -> str:
    model.save_pretrained(str(directory))
    if tokenizer is not None:
        with open(os.path.join(directory, "tokenizer.json"), "w", encoding="utf-8") as f:
            f.write(tokenizer)
    write_transformers_files(str(directory))
    return str(directory)


def load_hf(directory):
    return transformers.AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True).eval()


def tokens(model, batch=2, length=29, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (batch, length), generator=gen)


@pytest.mark.parametrize("core,memory,window", CASES, ids=IDS)
def test_transformers_model_gives_the_project_logits(core, memory, window, tmp_path):
    model = live_model(core, memory, window)
    directory = exported(model, tmp_path / "model")
    hf = load_hf(directory)
    assert type(hf).__name__ == "AtmaForCausalLM" and hf.config.model_type == "atma"
    ids = tokens(model)  # 29 tokens: several memory chunks, longer than the window
    with torch.no_grad():
        expected = model(ids).logits
        torch.testing.assert_close(hf(ids).logits, expected, rtol=0, atol=1e-5)
        # The same config.json and weights still load in the project, without transformers' keys.
        again = AtmaForCausalLM.from_pretrained(directory).eval()
        torch.testing.assert_close(again(ids).logits, expected, rtol=0, atol=0)
    assert expected.std().item() > 0.1


@pytest.mark.parametrize("core,memory,window", CASES, ids=IDS)
def test_generate_matches_the_project_cached_greedy_decoding(core, memory, window, tmp_path):
    model = live_model(core, memory, window)
    hf = load_hf(exported(model, tmp_path / "model"))
    ids = tokens(model, length=11)
    expected = greedy_generate(model, ids, 10, return_logits=True)
    out = hf.generate(ids, max_new_tokens=10, min_new_tokens=10, do_sample=False, return_dict_in_generate=True,
                      output_logits=True, pad_token_id=0)
    assert torch.equal(out.sequences[:, 11:], expected.tokens)
    torch.testing.assert_close(torch.stack(out.logits, dim=1), expected.logits, rtol=0, atol=1e-5)


def test_continuing_a_returned_cache_equals_one_forward(tmp_path):
    model = live_model("polar", True, 5)
    hf = load_hf(exported(model, tmp_path / "model"))
    ids = tokens(model, length=23)
    with torch.no_grad():
        expected = hf(ids, use_cache=False).logits
        first = hf(ids[:, :9], use_cache=True)
        cache = first.cache if hasattr(first, "cache") else first.past_key_values
        second = hf(ids[:, 9:], **{("cache" if hasattr(first, "cache") else "past_key_values"): cache}, use_cache=True)
    torch.testing.assert_close(torch.cat([first.logits, second.logits], dim=1), expected, rtol=0, atol=1e-5)


def test_beam_search_with_the_cache_equals_beam_search_without(tmp_path):
    model = live_model("nope", True, None)
    hf = load_hf(exported(model, tmp_path / "model"))
    ids = tokens(model, batch=2, length=7)
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, num_beams=3, do_sample=False, pad_token_id=0)
    assert torch.equal(hf.generate(ids, use_cache=True, **kwargs), hf.generate(ids, use_cache=False, **kwargs))


def test_labels_give_the_project_loss_and_left_padding_is_refused(tmp_path):
    model = live_model()
    hf = load_hf(exported(model, tmp_path / "model"))
    ids = tokens(model)
    with torch.no_grad():
        hf_loss = hf(ids, labels=ids).loss
        project_loss = model(ids[:, :-1], labels=ids[:, 1:]).loss
    torch.testing.assert_close(hf_loss, project_loss, rtol=0, atol=1e-5)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with pytest.raises(ValueError, match="left padding"):
        hf(ids, attention_mask=mask)
    right_padded = torch.ones_like(ids)
    right_padded[0, -3:] = 0
    with pytest.raises(ValueError, match="prompts of unequal length"):
        hf.generate(ids, attention_mask=right_padded, max_new_tokens=2, do_sample=False, pad_token_id=0)
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0  # right padding is fine: positions count from the first token
    with torch.no_grad():
        torch.testing.assert_close(hf(ids, attention_mask=mask).logits, hf(ids).logits, rtol=0, atol=0)


def test_directory_files_tokenizer_and_config_for_both_loaders(tiny_shards, tmp_path):
    model = live_model()
    with open(os.path.join(tiny_shards, "tokenizer.json"), encoding="utf-8") as f:
        tokenizer_json = f.read()
    directory = exported(model, tmp_path / "model", tokenizer_json)
    for name in SHIPPED_FILES + ("tokenizer_config.json", "generation_config.json"):
        assert os.path.isfile(os.path.join(directory, name)), name
    with open(os.path.join(directory, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_atma.AtmaForCausalLM"
    assert config["eos_token_id"] == 0 and config["dtype"] == "float32"
    # Every key beside the AtmaConfig fields is one the project's loader knows to skip.
    fields = {f.name for f in dataclasses.fields(AtmaConfig)}
    assert set(config) - fields <= TRANSFORMERS_CONFIG_KEYS
    assert AtmaConfig.load(os.path.join(directory, "config.json")) == model.config

    from tokenizers import Tokenizer

    tokenizer = transformers.AutoTokenizer.from_pretrained(directory, trust_remote_code=True)
    text = "def main():\n    return 0  # done\n"
    assert tokenizer(text)["input_ids"] == Tokenizer.from_str(tokenizer_json).encode(text).ids
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.eos_token_id == 0
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    # A rerun rewrites the same files (idempotent).
    before = {n: open(os.path.join(directory, n), encoding="utf-8").read() for n in ("config.json", "tokenizer_config.json")}
    write_transformers_files(directory)
    assert before == {n: open(os.path.join(directory, n), encoding="utf-8").read() for n in before}


def test_bf16_export_loads_in_bf16(tmp_path):
    model = live_model().to(torch.bfloat16)
    directory = exported(model, tmp_path / "model")
    with open(os.path.join(directory, "config.json"), encoding="utf-8") as f:
        assert json.load(f)["dtype"] == "bfloat16"
    hf = transformers.AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True, dtype="auto")
    assert hf.dtype == torch.bfloat16
    ids = tokens(model, length=12)
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids).logits, rtol=0, atol=0.1)


def test_shipped_code_imports_only_torch_and_transformers():
    allowed = {"__future__", "math", "torch", "transformers"}
    for name in SHIPPED_FILES:
        with open(shipped_path(name), encoding="utf-8") as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # the sibling shipped file
                    assert node.module == "configuration_atma", (name, node.module)
                    continue
                roots = {node.module.split(".")[0]}
            else:
                continue
            assert roots <= allowed, (name, roots)


def test_shipped_config_defaults_equal_the_project_config():
    shipped = inspect.signature(hf_configuration.AtmaConfig.__init__).parameters
    for f in dataclasses.fields(AtmaConfig):
        assert f.name in shipped, f.name
        assert shipped[f.name].default == f.default, f.name


def test_hf_export_command_reports_a_missing_directory_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pretrain.hf_export", str(tmp_path / "nowhere")], cwd=ROOT,
                          capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "config.json: missing" in proc.stderr


def test_hf_export_command_says_when_the_tokenizer_is_missing(tiny_shards, tmp_path, capsys):
    from pretrain import hf_export

    directory = tmp_path / "model"
    live_model().save_pretrained(str(directory))
    assert hf_export.main([str(directory)]) == 0
    assert "has no tokenizer.json" in capsys.readouterr().err
    shutil.copyfile(os.path.join(tiny_shards, "tokenizer.json"), directory / "tokenizer.json")
    assert hf_export.main([str(directory)]) == 0
    assert "has no tokenizer.json" not in capsys.readouterr().err
