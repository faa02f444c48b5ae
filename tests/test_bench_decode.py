"""The decode benchmark: its table and JSON on the CPU, and its correctness gate before any timing."""

import json

import pytest
import torch

import model.memory
from model import AtmaConfig
from model.bench_decode import check_cache, main, parse_lengths


def test_benchmark_reports_every_length_with_ratios(tmp_path, capsys):
    path = tmp_path / "decode.json"
    argv = ["--lengths", "48,96", "--decode-tokens", "3", "--warmup", "1", "--recompute-steps", "2", "--json", str(path)]
    assert main(argv) == 0
    record = json.loads(path.read_text())
    assert [row["length"] for row in record["rows"]] == [48, 96]
    assert record["preset"] == "tiny" and record["baseline_core"] == "nope"
    assert max(record["cache_check_max_logit_diff"].values()) < 1e-3
    for row in record["rows"]:
        polar, nope = row["polar"], row["nope"]
        for cell in (polar, nope):
            assert cell["prefill_s"] > 0 and cell["decode_ms_per_token"] > 0 and cell["cache_bytes"] > 0
            assert cell["decode_ms_min"] <= cell["decode_ms_per_token"] <= cell["decode_ms_max"]
        assert polar["cache_speedup"] == pytest.approx(polar["recompute_ms_per_token"] / polar["decode_ms_per_token"])
        assert row["decode_ratio_vs_baseline"] == pytest.approx(polar["decode_ms_per_token"] / nope["decode_ms_per_token"])
    # The keys and values grow with the context; the rest of the state does not.
    assert record["rows"][1]["polar"]["cache_bytes"] > record["rows"][0]["polar"]["cache_bytes"]
    out = capsys.readouterr().out
    assert "cache check" in out and out.count("\n48 | ") == 1 and out.count("\n96 | ") == 1
    assert record["complete"] is True


def test_the_lengths_done_are_written_when_a_longer_one_fails(tmp_path, monkeypatch, capsys):
    import model.bench_decode as bench_decode

    timed = bench_decode.time_cached

    def out_of_memory_at_96(model, prompt, *rest):
        if prompt.shape[1] == 96:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return timed(model, prompt, *rest)

    monkeypatch.setattr(bench_decode, "time_cached", out_of_memory_at_96)
    path = tmp_path / "decode.json"
    assert main(["--lengths", "48,96", "--decode-tokens", "2", "--recompute-steps", "0", "--json", str(path)]) == 1
    record = json.loads(path.read_text())
    assert [row["length"] for row in record["rows"]] == [48] and record["complete"] is False
    assert capsys.readouterr().err.strip() == "error: CUDA out of memory"


def test_no_timing_is_reported_when_the_cache_is_wrong(monkeypatch, capsys):
    original = model.memory.gated_delta_step

    def forgetful_step(q, k, v, g, beta, state):
        return original(q, k, v, g, beta, torch.zeros_like(state))

    monkeypatch.setattr(model.memory, "gated_delta_step", forgetful_step)
    with pytest.raises(RuntimeError, match="differs from recomputation"):
        check_cache(AtmaConfig.from_preset("tiny"), torch.device("cpu"), prompt_len=40, steps=3)
    assert main(["--lengths", "48", "--decode-tokens", "1", "--recompute-steps", "0"]) == 1
    captured = capsys.readouterr()
    assert "error: cached decoding differs" in captured.err and "48 | " not in captured.out


def test_lengths_parse_and_reject_bad_values():
    assert parse_lengths("2k, 8k,100") == [2048, 8192, 100]
    with pytest.raises(SystemExit):
        main(["--lengths", "2x"])
