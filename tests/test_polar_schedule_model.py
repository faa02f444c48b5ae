"""The list-scheduling model of the Polar launches (`kernels.polar.schedule_model`), on cases small
enough to work out by hand."""

from __future__ import annotations

import os

import pytest

from kernels.polar import schedule_model


def test_program_costs_follow_the_causal_band_in_each_order():
    # T = 64, BM = 32, BN = 16: query tile 0 visits 2 key tiles, tile 1 visits 4; two (b, h) slices
    assert schedule_model.program_costs("fwd", 64, 32, 16, 2, 4, longest_first=False) == [2, 4, 2, 4]
    assert schedule_model.program_costs("dq", 64, 32, 16, 2, 4, longest_first=True) == [4, 4, 2, 2]
    # a ragged last query tile sees every key (T = 40: ceil(40 / 16) = 3)
    assert schedule_model.program_costs("fwd", 40, 32, 16, 1, 1, longest_first=True) == [3, 2]
    # T = 64, BM = 16, BN = 32, 2 query heads per KV head: key tile 0 is seen by 4 query tiles, tile 1 by 2
    assert schedule_model.program_costs("dkdv", 64, 16, 32, 2, 2, longest_first=False) == [8, 4, 8, 4]
    assert schedule_model.program_costs("dkdv", 64, 16, 32, 2, 2, longest_first=True) == [8, 8, 4, 4]
    with pytest.raises(ValueError, match="kind must be fwd, dq or dkdv"):
        schedule_model.program_costs("rows", 64, 16, 16, 1, 1, longest_first=True)


def test_busy_time_takes_programs_in_id_order():
    assert schedule_model.busy_time([3, 3, 2, 2, 2], 2) == 7
    assert schedule_model.busy_time([1, 1, 4], 2) == 5  # the long program starts last
    assert schedule_model.busy_time([4, 1, 1], 2) == 4
    assert schedule_model.busy_time([5], 3) == 5


def test_model_prints_each_launch(capsys, monkeypatch):
    monkeypatch.delenv("ATMA_POLAR_TRITON_PROFILE", raising=False)
    assert schedule_model.main(["--seq-lens", "2048", "--sms", "132"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and [line.split()[3] for line in lines[1:]] == ["fwd", "dq", "dkdv"]
    recs = {rec["kind"]: rec for rec in schedule_model.model(2048)}
    assert recs["dkdv"]["programs"] == 2048 // recs["dkdv"]["tile"][1] * 8 * 2
    for rec in recs.values():
        assert 1.0 <= rec["longest_first"] <= rec["in_order"]
        assert rec["speedup"] == pytest.approx(rec["in_order"] / rec["longest_first"])
    assert "ATMA_POLAR_TRITON_PROFILE" not in os.environ
    with pytest.raises(SystemExit) as info:
        schedule_model.main(["--sms", "0"])
    assert info.value.code == 2
