"""--device of the command-line tools: a device this machine lacks or a bad name is one line and exit 2."""

import importlib

import pytest
import torch

from model.device import usable_device

TOOLS = ["model.__main__", "model.bench_loss", "model.bench_decode", "pretrain.bench"]


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.mark.parametrize("tool", TOOLS)
@pytest.mark.parametrize("name, message", [
    ("cuda", "error: --device cuda: CUDA is not available on this machine"),
    ("cuda:1", "error: --device cuda:1: CUDA is not available on this machine"),
    ("foo", "error: --device 'foo': unknown device; use cpu, cuda or cuda:N"),
])
def test_a_device_this_machine_lacks_is_one_line_and_exit_2(no_cuda, capsys, tool, name, message):
    main = importlib.import_module(tool).main
    assert main(["--device", name]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == message and "Traceback" not in captured.err


def test_usable_device(monkeypatch):
    assert usable_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"^--device 'meta': unknown device; use cpu, cuda or cuda:N$"):
        usable_device("meta")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert usable_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ValueError, match=r"^--device cuda:2: this machine has 2 CUDA device\(s\), cuda:0 to cuda:1$"):
        usable_device("cuda:2")


def test_the_evaluation_takes_the_same_devices(no_cuda):
    from evaluation.errors import EvaluationError
    from evaluation.loading import resolve_device

    assert resolve_device(None) == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    for name, message in [("cuda:1", "--device cuda:1: CUDA is not available on this machine"),
                          ("meta", "--device 'meta': unknown device; use cpu, cuda or cuda:N")]:
        with pytest.raises(EvaluationError) as err:
            resolve_device(name)
        assert str(err.value) == message
