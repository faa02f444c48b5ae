"""The counter of the host's waits for the GPU (`pretrain/host_syncs.py`): what it counts, in which step, at which
line, and that it leaves torch and the warnings as it found them. Without a GPU the two kinds of wait are played:
torch's sync debug mode by its warning, the explicit synchronisations by stand-ins."""

import sys
import threading
import warnings

import pytest
import torch

from pretrain.host_syncs import SYNC_WARNING, HostSyncCounter, count_host_syncs, host_sync_text, site_of


@pytest.fixture
def stand_ins(monkeypatch):
    """torch.cuda.synchronize and Event.synchronize as no-ops, callable without a GPU."""
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args, **kwargs: None)
    monkeypatch.setattr(torch.cuda.Event, "synchronize", lambda self: None)
    return torch.cuda.synchronize, torch.cuda.Event.synchronize


def caller_site(depth: int = 2) -> str:
    """The site of the line that called the caller of this function."""
    frame = sys._getframe(depth)
    return site_of(frame.f_code.co_filename, frame.f_lineno)


def debug_mode_wait() -> str:
    """A wait as torch's sync debug mode reports it (a warning at the caller's line); returns that line's site."""
    warnings.warn(f"{SYNC_WARNING} (Triggered internally at /pytorch/c10/cuda/CUDAFunctions.cpp:151.)",
                  stacklevel=2)
    return caller_site()


def test_each_wait_is_counted_in_its_step_at_the_line_that_made_it(stand_ins):
    synchronize, event_synchronize = stand_ins
    outside = []
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        with HostSyncCounter(torch.device("cuda")) as counter:
            debug_mode_wait()  # before the first step: in none
            counter.new_step()
            first = debug_mode_wait()
            torch.cuda.synchronize(); sync_site = caller_site(1)  # noqa: E702 (one line: one site)
            warnings.warn("not a wait")
            counter.new_step()
            second = debug_mode_wait()
            torch.cuda.Event.synchronize(object()); event_site = caller_site(1)  # noqa: E702 (one line: one site)
            again = debug_mode_wait()
            worker = threading.Thread(target=lambda: outside.append(debug_mode_wait()))  # the autograd engine's
            worker.start()
            worker.join()
        after = debug_mode_wait()  # the counter has stopped
    assert counter.per_step == [2, 4]
    assert dict(counter.steps[0]) == {first: 1, sync_site: 1}
    assert dict(counter.steps[1]) == {second: 1, event_site: 1, again: 1, outside[0]: 1}
    assert first.startswith("tests/test_host_syncs.py:") and len({first, second, again, sync_site, event_site}) == 5
    assert sorted(n for _, n in counter.sites()) == [1] * 6
    # Every other warning is shown once the counter stops, and a wait after it is not counted.
    texts = [str(w.message) for w in shown]
    assert texts[0] == "not a wait" and texts[1].startswith(SYNC_WARNING) and len(texts) == 2
    assert site_of(shown[1].filename, shown[1].lineno) == after
    assert torch.cuda.synchronize is synchronize and torch.cuda.Event.synchronize is event_synchronize


def test_waits_are_counted_per_step_over_several_steps_only_on_cuda(stand_ins):
    sites = []

    def step():
        sites.append(debug_mode_wait())
        if len(sites) == 2:  # one more wait in the second step
            torch.cuda.synchronize()

    assert count_host_syncs(step, 3, torch.device("cpu")) is None and sites == []  # nothing waits for a device
    assert count_host_syncs(step, 0, torch.device("cuda")) is None
    found = count_host_syncs(step, 3, torch.device("cuda"))
    assert found["host_syncs_all"] == [1, 2, 1] and found["host_syncs_per_step"] == 2
    (wait_site,) = set(sites)
    assert found["host_sync_sites"][0] == {"site": wait_site, "per_step": 1.0}
    assert found["host_sync_sites"][1]["per_step"] == pytest.approx(1 / 3)
    assert host_sync_text(found).startswith(f"2 per step ({wait_site} x1, tests/test_host_syncs.py:")
    assert host_sync_text({"host_syncs_per_step": 0, "host_sync_sites": []}) == "0 per step"


def test_sites_are_named_from_the_repository_or_the_installed_packages():
    assert site_of(__file__, 7) == "tests/test_host_syncs.py:7"
    installed = "/x/lib/python3.11/site-packages/deepspeed/runtime/engine.py"
    assert site_of(installed, 12) == "deepspeed/runtime/engine.py:12"
    assert site_of("/elsewhere/y.py", 3) == "/elsewhere/y.py:3"


def test_the_benchmark_counts_a_cases_waits_in_steps_of_its_own(stand_ins):
    from types import SimpleNamespace

    from pretrain.bench import host_syncs

    sites = []
    on_gpu = SimpleNamespace(device=torch.device("cuda"), run=lambda: sites.append(debug_mode_wait()))
    found = host_syncs(on_gpu, 2)
    assert found["host_syncs_all"] == [1, 1] and found["host_sync_sites"] == [{"site": sites[0], "per_step": 1.0}]
    on_cpu = SimpleNamespace(device=torch.device("cpu"), run=lambda: sites.append(debug_mode_wait()))
    assert host_syncs(on_cpu, 2) == {"host_syncs_per_step": None, "host_syncs_all": None, "host_sync_sites": None}
    assert len(sites) == 2  # no step run on the CPU
