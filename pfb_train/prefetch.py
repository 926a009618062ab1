"""Bring the next batch to the GPU while the current step runs.

A host-to-device copy on the compute stream waits for the step before it and holds up the
one after it: a float32 batch of 256 images at 224 px is 154 MB, several milliseconds of
PCIe per step. On a side stream the copy engine moves batch i+1 while the SMs run step i.
With `data.decode: device` the decode and crops of batch i+1 are queued on that stream too.
"""

from __future__ import annotations

import contextlib

import torch

from pfb_train.wrapped_loader import WrappedLoader


class DevicePrefetcher(WrappedLoader):
    """Wraps a loader of (images, labels, indices); yields them on `device`, one batch ahead.

    Off CUDA there is no side stream: batches are moved when fetched, and the wrapper only
    keeps the one-ahead order (so the CPU tests run the same code)."""

    def __init__(self, loader, device):
        super().__init__(loader)
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def __iter__(self):
        batches = iter(self.loader)
        upcoming = self._fetch(batches)
        while upcoming is not None:
            current = upcoming
            if self.stream is not None:
                compute = torch.cuda.current_stream(self.device)
                compute.wait_stream(self.stream)  # this batch's copy, not the one queued next
                for t in current:
                    t.record_stream(compute)  # the allocator must not reuse it while the step runs
            upcoming = self._fetch(batches)  # queued before this step's kernels: runs beside them
            yield current

    def _fetch(self, batches):
        with torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext():
            batch = next(batches, None)
            if batch is None:
                return None
            return tuple(t.to(self.device, non_blocking=True) for t in batch)
