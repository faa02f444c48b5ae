"""The CPU debug run reproduces its golden losses (tests/assets/losses/tiny-cpu.txt)."""

import pytest

from golden_loss import GOLDEN_FILE, data_id, mismatches, read_golden

pytestmark = pytest.mark.slow


def test_first_20_losses_match_the_golden_file(tiny_shards, golden_run_losses):
    header, expected = read_golden(GOLDEN_FILE)
    assert header["data_id"] == data_id(tiny_shards), (
        "the built-in shards differ from the golden run's (another Python standard library?)")
    got = golden_run_losses
    assert not mismatches(expected, got), "\n".join(mismatches(expected, got))


def test_mismatch_report_names_the_step():
    expected = [7.0, 6.0, 5.0]
    assert mismatches(expected, [7.0, 6.0, 5.0]) == []
    assert mismatches(expected, [7.0, 6.0 * (1 + 2e-4), 5.0]) == ["step 2: 6.00120000 vs golden 6.00000000"]
    assert mismatches(expected, [7.0, 6.0]) == ["2 steps, the golden file has 3"]
