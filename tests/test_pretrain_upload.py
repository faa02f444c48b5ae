"""On a GPU: a micro-batch reaches the device without the host waiting for the work queued before it."""

import time

import pytest
import torch

from pretrain.step import upload


@pytest.mark.gpu
def test_gpu_a_micro_batch_upload_does_not_wait_for_queued_work():
    device = torch.device("cuda")
    # Pageable, as the loader makes them (and strided, as the benchmark's synthetic stream does): (16, 2048) int64.
    tokens = torch.randint(0, 50_000, (16, 2049))
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    upload(inputs, device), upload(labels, device)  # as in a run's steady state: page-locked blocks cached
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)  # about a second of device work queued ahead of the copies
    start = time.perf_counter()
    on_device = [upload(inputs, device), upload(labels, device)]
    queued = time.perf_counter() - start
    torch.cuda.synchronize()
    total = time.perf_counter() - start
    assert total > 0.3, f"the queued work took {total:.3f} s: too short to tell a wait from none"
    assert queued < 0.1 * total, f"the copies kept the host {queued:.3f} s of the queued work's {total:.3f} s"
    assert torch.equal(on_device[0].cpu(), inputs) and torch.equal(on_device[1].cpu(), labels)
    # A tensor already on the device is passed through.
    assert upload(on_device[0], device) is on_device[0]
