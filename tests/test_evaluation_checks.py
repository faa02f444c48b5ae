"""The evaluation's checks before and while it runs: weights against export.json, non-finite logits,
out-of-memory cells on the CPU, and the printed plan with its time estimate."""

import inspect
import json
import os
import shutil
import string
import textwrap

import pytest
import torch
from eval_fixtures import export_tiny_model, write_export_info

from evaluation import long_context, plan
from evaluation.long_context import main
from evaluation.plan import ForwardTime, trunk_flops_per_token
from model import AtmaConfig, AtmaForCausalLM

CPU_OOM = ("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried to "
           "allocate 68719476736 bytes. Error code 12 (Cannot allocate memory)")
QUICK = ["--tasks", "passkey", "--haystacks", "synthetic", "--depths", "0.5", "--trials", "2", "--no-progress"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> str:
    corpus = [inspect.getsource(m) for m in (json.decoder, textwrap, string)]
    return export_tiny_model(str(tmp_path_factory.mktemp("exported")), corpus)


@pytest.fixture
def model_copy(exported, tmp_path) -> str:
    target = str(tmp_path / "model")
    shutil.copytree(exported, target)
    return target


def _run(capsys, model_dir, out, *args):
    code = main([model_dir, "--out", str(out), *args])
    return code, capsys.readouterr()


def _damage(path, fill: bytes) -> None:
    """Overwrite the second half of a safetensors file (tensor data, past its header) with `fill`."""
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(size // 2)
        f.write(fill * (size - size // 2))


def test_an_unknown_kernel_choice_is_refused_before_loading(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ATMA_KERNELS", "fast")
    code, out = _run(capsys, str(tmp_path / "no-model"), tmp_path / "eval", "--lengths", "64", *QUICK)
    assert code == 2 and out.out == ""
    assert out.err == "error: the environment variable ATMA_KERNELS must be one of auto, triton, torch, got 'fast'\n"
    assert not (tmp_path / "eval").exists()


def test_weights_that_changed_after_export_are_refused(model_copy, tmp_path, capsys):
    weights = os.path.join(model_copy, "model.safetensors")
    _damage(weights, b"\x00")
    code, out = _run(capsys, model_copy, tmp_path / "eval", "--lengths", "64", *QUICK)
    listed = json.load(open(os.path.join(model_copy, "export.json")))["weights_sha256"]["model.safetensors"]
    assert code == 2 and out.out == ""
    [line] = out.err.splitlines()
    assert line.startswith(f"error: {weights}: sha256 ") and line.endswith(
        f" does not match export.json ({listed[:12]}...); the file changed after export, export it again")
    assert not (tmp_path / "eval").exists()
    os.remove(weights)
    code, out = _run(capsys, model_copy, tmp_path / "eval", "--lengths", "64", *QUICK)
    assert code == 2 and out.err.strip() == f"error: {weights}: missing (listed in export.json)"


def test_an_older_export_evaluates_with_one_notice(model_copy, tmp_path, capsys):
    info = json.load(open(os.path.join(model_copy, "export.json")))
    del info["weights_sha256"], info["seq_len"]
    json.dump(info, open(os.path.join(model_copy, "export.json"), "w"))
    code, out = _run(capsys, model_copy, tmp_path / "eval", "--lengths", "64", *QUICK)
    notice = f"{model_copy}: export.json records no weights_sha256 (an older export); the weights are loaded unchecked"
    assert code == 0, out.err
    assert [line for line in out.err.splitlines() if not line.startswith(("plan:", "  L="))] == [f"notice: {notice}"]
    results = json.load(open(tmp_path / "eval" / "results.json"))
    assert notice in results["metadata"]["notes"] and results["metadata"]["training_seq_len"] is None
    assert "- training: sequence length unknown" in (tmp_path / "eval" / "report.md").read_text()


def test_garbage_weights_stop_at_the_first_forward(model_copy, tmp_path, capsys):
    _damage(os.path.join(model_copy, "model.safetensors"), b"\xff")  # all-ones fp32 words are NaN
    write_export_info(model_copy)  # as exported: the checksum describes the damaged file
    code, out = _run(capsys, model_copy, tmp_path / "eval", "--lengths", "64,128", *QUICK)
    assert code == 2 and out.out == ""
    [line] = out.err.splitlines()
    assert line.startswith(f"error: {model_copy}: non-finite logits (") and line.endswith(
        " at the first forward (64 tokens): the weights are damaged or training diverged; nothing was evaluated")
    assert not (tmp_path / "eval").exists()


def _failing_above(monkeypatch, length: int, failure) -> None:
    """Make the model's trunk fail (raise, or return NaN) for inputs longer than `length` tokens."""
    trunk = AtmaForCausalLM.trunk

    def wrapped(self, input_ids, *args, **kwargs):
        if input_ids.shape[1] <= length:
            return trunk(self, input_ids, *args, **kwargs)
        if isinstance(failure, BaseException):
            raise failure
        hidden, *rest = trunk(self, input_ids, *args, **kwargs)
        return (torch.full_like(hidden, float("nan")), *rest)

    monkeypatch.setattr(AtmaForCausalLM, "trunk", wrapped)


@pytest.mark.parametrize("failure", [RuntimeError(CPU_OOM), MemoryError()], ids=["torch allocator", "MemoryError"])
def test_an_out_of_memory_length_on_the_cpu_is_that_cells_error(exported, tmp_path, capsys, monkeypatch, failure):
    _failing_above(monkeypatch, 150, failure)  # the plan's timing forwards (64, 160 tokens) fail as well
    code, out = _run(capsys, exported, tmp_path / "eval", "--lengths", "64,160", *QUICK)
    assert code == 0, out.err
    results = json.load(open(tmp_path / "eval" / "results.json"))
    short, long = results["retrieval"]
    assert short["length"] == 64 and 0 <= short["token_acc"] <= 1 and "error" not in short
    detail = CPU_OOM if isinstance(failure, RuntimeError) else "MemoryError"
    assert long["length"] == 160 and long["error"] == f"out of memory ({detail})" and "token_acc" not in long
    assert f"- passkey/synthetic L=160 depth=0.5: out of memory ({detail})" in (tmp_path / "eval" / "report.md").read_text()
    assert (tmp_path / "eval" / "retrieval.png").is_file()
    assert out.err.splitlines()[-1].startswith(f"warning: 1 of 2 cells failed, first: out of memory ({detail})")
    assert out.err.splitlines()[0].startswith("plan: 2 cells at 2 lengths") and "forwards of 64 tokens in " in out.err
    assert "and 160 tokens" not in out.err


def test_non_finite_logits_in_a_cell_are_that_cells_error_and_exit_1(exported, tmp_path, capsys, monkeypatch):
    _failing_above(monkeypatch, 160, "nan")  # the plan's timing forwards (64, 160 tokens) are finite
    code, out = _run(capsys, exported, tmp_path / "eval", "--lengths", "64,160", *QUICK)
    assert code == 1
    results = json.load(open(tmp_path / "eval" / "results.json"))
    short, long = results["retrieval"]
    assert "error" not in short and short["nll"] > 0
    value_tokens = results["metadata"]["needles"]["passkey"][0]["value_tokens"]
    scored = value_tokens * results["metadata"]["config"]["vocab_size"]
    assert long["error"] == (f"non-finite logits ({scored:,} NaN, 0 inf of {scored:,}) at the scored positions of a "
                             f"{160 + value_tokens - 1}-token input")
    assert "token_acc" not in long


def test_the_plan_is_printed_first_and_warns_when_long(exported, tmp_path, capsys, monkeypatch):
    code, out = _run(capsys, exported, tmp_path / "eval", "--lengths", "64,128", *QUICK)
    assert code == 0
    lines = out.err.splitlines()
    results = json.load(open(tmp_path / "eval" / "results.json"))
    work = results["metadata"]["plan"]
    value = results["metadata"]["needles"]["passkey"]
    forward = {n: n + max(v["value_tokens"] for v in value) - 1 for n in (64, 128)}
    assert work["cells"] == 2 and work["tokens"] == 2 * forward[64] + 2 * forward[128]
    assert lines[0].startswith(f"plan: 2 cells at 2 lengths, {work['tokens']:,} tokens through the model on cpu, about ")
    assert lines[1].startswith(f"  L=64: 1 cells, 2 forwards, {2 * forward[64]:,} tokens, about ")
    assert lines[2].startswith(f"  L=128: 1 cells, 2 forwards, {2 * forward[128]:,} tokens, about ")
    assert not any(line.startswith("warning:") for line in lines)
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "- training: sequence length 64, 409,600 tokens seen" in report
    monkeypatch.setattr(plan, "LONG_RUN_SECONDS", 0.0)
    code, out = _run(capsys, exported, tmp_path / "eval2", "--lengths", "64,128", *QUICK)
    [warning] = [line for line in out.err.splitlines() if line.startswith("warning:")]
    assert warning.startswith("warning: this evaluation should take about ") and warning.endswith(
        "at L=128; shorten --lengths, lower --trials, --depths or --max-docs, or run on a GPU")
    assert json.load(open(tmp_path / "eval2" / "results.json"))["metadata"]["plan"]["warning"] == warning[9:]


def test_forward_time_fit_recovers_overhead_and_flop_cost():
    config = AtmaConfig.from_preset("atma-378m")
    overhead, per_flop = 0.05, 1e-11

    def seconds(n):
        return overhead + per_flop * n * trunk_flops_per_token(config, n)

    fitted = ForwardTime.fit(config, (256, seconds(256)), (512, seconds(512)))
    assert fitted.overhead == pytest.approx(overhead) and fitted.per_flop == pytest.approx(per_flop)
    assert fitted.seconds(65536) == pytest.approx(seconds(65536))
    # The attention term makes a 64K forward cost far more than 256x a 256-token one.
    assert seconds(65536) - overhead > 300 * (seconds(256) - overhead)
    # Noise that makes the longer forward faster: no overhead, the slower rate of the two.
    noisy = ForwardTime.fit(config, (256, 0.5), (512, 0.3))
    assert noisy.overhead == 0.0
    assert noisy.per_flop == pytest.approx(0.5 / (256 * trunk_flops_per_token(config, 256)))


def test_cpu_out_of_memory_is_told_apart_from_other_errors():
    assert long_context.is_cpu_out_of_memory(RuntimeError(CPU_OOM))
    assert long_context.is_cpu_out_of_memory(MemoryError())
    assert not long_context.is_cpu_out_of_memory(RuntimeError("shape mismatch"))


def test_an_out_path_that_cannot_be_a_directory_fails_before_any_work(exported, tmp_path, capsys, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(long_context, "load_model", never)
    target = tmp_path / "afile"
    target.write_text("keep me")
    for out, message in [(target, "exists and is not a directory; --out names the directory the results go to"),
                         (target / "eval", f"cannot create the output directory ({target} is not a directory)")]:
        code, printed = _run(capsys, exported, out, "--lengths", "64", *QUICK)
        assert code == 2 and printed.out == "" and printed.err == f"error: {out}: {message}\n"
    assert target.read_text() == "keep me"
