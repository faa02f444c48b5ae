"""Distillation teachers from Hugging Face `transformers`: a local model directory loads as one, the LM head
runs on one chunk of rows at a time (with the soft cap or scale its config names), a model that changes its
logits after the head in another way keeps its whole logits, and the decoder layers compile without graph
breaks. (An ATMA teacher: test_compile.py, test_pretrain_distributed.py.)"""

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
    decoder, head = teacher.split.decoder, teacher.split.head
    assert teacher.split.transform is None
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


TRANSFORMED = {  # a model that changes its head's output by a transform its config names, and that transform
    "gemma2 soft cap": (lambda: transformers.Gemma2ForCausalLM(
        transformers.Gemma2Config(**SMALL, head_dim=16, final_logit_softcapping=0.5)), "soft cap 0.5"),
    "cohere logit scale": (lambda: transformers.CohereForCausalLM(
        transformers.CohereConfig(**SMALL, logit_scale=0.25)), "x logit_scale 0.25"),
    "granite logits scaling": (lambda: transformers.GraniteForCausalLM(
        transformers.GraniteConfig(**SMALL, logits_scaling=4.0)), "/ logits_scaling 4"),
}


@pytest.mark.parametrize("kind,dtype", [(kind, torch.float32) for kind in TRANSFORMED]
                         + [("gemma2 soft cap", torch.bfloat16)], ids=str)
def test_a_cap_or_scale_named_by_the_config_runs_on_each_chunk(tmp_path, kind, dtype):
    torch.manual_seed(0)
    build, transform_name = TRANSFORMED[kind]
    build().save_pretrained(str(tmp_path / "model"))
    teacher = Teacher(str(tmp_path / "model"), device=torch.device("cpu"), dtype=dtype, vocab_size=STUDENT_VOCAB)
    assert teacher.split is not None and teacher.split.transform is not None and teacher.whole_logits_note is None
    assert teacher.split.transform_name == transform_name
    head_rows = []
    teacher.split.head.register_forward_pre_hook(lambda module, args: head_rows.append(args[0].shape[0]))
    batch = ids()
    rows = teacher.target_rows(batch)
    got = torch.cat([rows(0, 16), rows(16, 48)])
    assert head_rows == [16, 32]
    expected = whole_logits(teacher, batch)
    raw = teacher.split.head(teacher.split.decoder(input_ids=batch).last_hidden_state).reshape(-1, VOCAB)
    assert (raw[:, :STUDENT_VOCAB].float() - expected.float()).abs().max() > 0.1  # the head's output is not them
    torch.testing.assert_close(got, expected.float(), rtol=1e-5, atol=1e-6)


def test_a_teacher_that_changes_its_logits_in_another_way_keeps_its_whole_logits(tmp_path, monkeypatch, capsys):
    path = save_llama(tmp_path / "llama")
    load_model = transformers.AutoModelForCausalLM.from_pretrained

    def shifted(*args, **kwargs):  # logits + 1 after the head: no config names it
        model = load_model(*args, **kwargs)
        model.register_forward_hook(lambda module, inputs, out: out.__setitem__("logits", out.logits + 1.0))
        return model

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", shifted)
    teacher = load(path)
    assert teacher.split is None
    assert "whole logits (tokens x vocabulary) are kept" in teacher.whole_logits_note
    batch = ids()
    expected = whole_logits(teacher, batch)
    head = teacher.model.get_output_embeddings()
    raw = head(teacher.model.get_decoder()(input_ids=batch).last_hidden_state).reshape(-1, VOCAB)
    torch.testing.assert_close(expected, raw[:, :STUDENT_VOCAB] + 1.0)  # the shift is in the targets
    torch.testing.assert_close(teacher.target_rows(batch)(0, 48), expected, rtol=1e-6, atol=1e-7)

    # The benchmark says so too, once for the teacher its cases share.
    from pretrain.bench import case_teacher
    from pretrain.config import load_run_config

    cfg = load_run_config(None, [f"data.dir={tmp_path}", f"loss.teacher={path}", "loss.distill_weight=0.5"])
    loaded = {}
    for _ in range(2):
        case_teacher(cfg, AtmaConfig.from_preset("tiny", vocab_size=STUDENT_VOCAB), {"bf16": {"enabled": False}},
                     torch.device("cpu"), loaded)
    assert capsys.readouterr().out.count("whole logits (tokens x vocabulary) are kept") == 1


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
