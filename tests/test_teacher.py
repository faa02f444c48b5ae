"""Distillation teachers from Hugging Face `transformers`: a local model directory loads as one, the LM head
runs on one chunk of rows at a time, a model that changes its logits after the head keeps its whole logits,
and the decoder layers compile without graph breaks. (An ATMA teacher: test_compile.py,
test_pretrain_distributed.py.)"""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from model import AtmaConfig, AtmaForCausalLM  # noqa: E402
from pretrain.teacher import Teacher, is_atma_dir  # noqa: E402

VOCAB = 300  # the teacher's; the student's below is narrower, so its rows are cut to STUDENT_VOCAB
STUDENT_VOCAB = 256
SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)


def save_llama(path) -> str:
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL)).save_pretrained(str(path))
    return str(path)


def load(path, **kw) -> Teacher:
    return Teacher(path, device=torch.device("cpu"), dtype=torch.float32, vocab_size=STUDENT_VOCAB, **kw)


def ids(t=24):
    return torch.randint(0, STUDENT_VOCAB, (2, t), generator=torch.Generator().manual_seed(3))


def whole_logits(teacher: Teacher, batch) -> torch.Tensor:
    with torch.no_grad():
        return teacher.model(input_ids=batch).logits.reshape(-1, VOCAB)[:, :STUDENT_VOCAB]


def test_a_local_hugging_face_directory_is_not_taken_for_an_atma_export(tmp_path):
    hf_dir = save_llama(tmp_path / "llama")
    AtmaForCausalLM(AtmaConfig.from_preset("tiny", vocab_size=STUDENT_VOCAB)).save_pretrained(str(tmp_path / "atma"))
    assert not is_atma_dir(hf_dir)
    assert is_atma_dir(str(tmp_path / "atma"))
    # the Hugging Face export of an ATMA model names its own type
    config = json.loads((tmp_path / "atma" / "config.json").read_text())
    (tmp_path / "atma" / "config.json").write_text(json.dumps({**config, "model_type": "atma"}))
    assert is_atma_dir(str(tmp_path / "atma"))
    assert not is_atma_dir(str(tmp_path))  # no weights
    teacher = load(hf_dir)
    assert not teacher.is_atma and isinstance(teacher.model, transformers.LlamaForCausalLM)


def test_the_head_runs_on_each_chunk_of_rows_only_and_gives_the_models_logits(tmp_path):
    teacher = load(save_llama(tmp_path / "llama"))
    assert teacher.split is not None and teacher.whole_logits_note is None
    decoder, head = teacher.split
    head_rows, caches = [], []
    head.register_forward_pre_hook(lambda module, args: head_rows.append(args[0].shape[0]))
    decoder.register_forward_hook(lambda module, args, out: caches.append(out.past_key_values))
    batch = ids()
    rows = teacher.target_rows(batch)
    got = torch.cat([rows(0, 20), rows(20, 48)])
    assert head_rows == [20, 28]  # the whole logits (48 rows) were never asked for
    assert caches == [None]  # one decoder pass, and no KV cache built for it
    assert got.dtype == torch.float32 and got.shape == (48, STUDENT_VOCAB)
    torch.testing.assert_close(got, whole_logits(teacher, batch), rtol=1e-5, atol=1e-6)


def test_a_teacher_that_caps_its_logits_after_the_head_keeps_its_whole_logits(tmp_path):
    torch.manual_seed(0)
    config = transformers.Gemma2Config(**SMALL, head_dim=16, final_logit_softcapping=0.5)
    transformers.Gemma2ForCausalLM(config).save_pretrained(str(tmp_path / "gemma"))
    teacher = load(str(tmp_path / "gemma"))
    assert teacher.split is None
    assert "whole logits (tokens x vocabulary) are kept" in teacher.whole_logits_note
    batch = ids()
    expected = whole_logits(teacher, batch)
    assert expected.abs().max() <= 0.5  # capped: the head's own output is not the logits
    torch.testing.assert_close(teacher.target_rows(batch)(0, 48), expected, rtol=1e-6, atol=1e-7)


def test_compiled_decoder_layers_give_the_eager_targets_in_one_graph(tmp_path):
    from pretrain.compilation import dynamo_summary

    path = save_llama(tmp_path / "llama")
    batch = ids()
    targets = {}
    torch._dynamo.reset()
    before = dynamo_summary()
    for compiled in (False, True):
        teacher = load(path, compile_blocks=compiled)
        assert teacher.compiled == compiled
        targets[compiled] = teacher.target_rows(batch)(0, batch.numel())
    after = dynamo_summary()
    # both layers share one graph (inductor), with no break
    assert (after["graphs"] - before["graphs"], after["graph_breaks"] - before["graph_breaks"]) == (1, 0)
    torch.testing.assert_close(targets[True], targets[False], rtol=1e-5, atol=1e-5)


def test_a_transformers_that_cannot_import_its_model_code_is_one_config_error(tmp_path, monkeypatch):
    from pretrain.config import ConfigError
    from pretrain.teacher import load_teacher

    path = save_llama(tmp_path / "llama")

    def shadowed(*args, **kwargs):
        raise ImportError("cannot import name 'CUDAProperties' from 'kernels'")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", shadowed)
    with pytest.raises(ConfigError) as err:
        load_teacher(path, device=torch.device("cpu"), bf16=False, vocab_size=STUDENT_VOCAB)
    assert str(err.value) == (
        f"loss.teacher {path!r} could not be loaded: transformers cannot load it here (cannot import name "
        "'CUDAProperties' from 'kernels'); requirements-eval.txt names the transformers versions this project "
        "works with")
