"""Bring the next batches to the GPU while the current step runs, from a background thread.

A host-to-device copy on the compute stream waits for the step before it and holds up the
one after it: a float32 batch of 256 images at 224 px is 154 MB, several milliseconds of
PCIe per step (the `cpu` decode path ships uint8, a quarter of that). On a side stream the
copy engine moves the next batch while the SMs run this step. The uint8 batch is normalised
there after its copy (normalize.py); with `data.decode: device` the decode, crops and flips
are queued there too.

Why a thread: the host side of device decoding (nvJPEG's batched call, ~2 small kernels
launched per image) takes milliseconds per batch. Done between two steps on the training
thread, it would leave the GPU idle once the step's one host sync (the non-finite check)
has drained the queue. The thread does that work while the training thread waits on the
GPU; PyTorch releases the GIL inside its ops, so the two threads overlap. It is used only
where producing a batch draws from no global RNG (DataLoader workers run the transforms,
or device decoding draws from the loader's own generator): a transform running on a second
thread of the training process would interleave its draws with the training thread's
(mixup) at random, and seeded runs would no longer repeat. Otherwise the next batch is
staged one ahead on the training thread.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from typing import Iterator

import torch

from pfb_train.data.wrapped import WrappedLoader

_END = object()  # the producer's last item: the epoch is over


class DevicePrefetcher(WrappedLoader):
    """Wraps a loader of (images, labels, indices); yields them on `device`, staged ahead on a side stream.

    `threaded`: a producer thread stages up to `depth` batches ahead (see above); otherwise the
    training thread stages one ahead. `finish`: applied to each batch on the side stream after its
    copy (normalize.Normalize: uint8 images to normalised float32). Off CUDA there is no side
    stream, so the CPU tests run the same code. Batches keep the loader's order; an error in the
    loader is raised here."""

    def __init__(self, loader, device, threaded: bool = True, depth: int = 2, finish=None):
        super().__init__(loader)
        self.device = torch.device(device)
        self.threaded, self.depth, self.finish = threaded, depth, finish
        self.stream = None
        if self.device.type == "cuda":
            if self.device.index is None:  # a thread's current device is its own: name it
                self.device = torch.device("cuda", torch.cuda.current_device())
            self.stream = torch.cuda.Stream(self.device)

    def __iter__(self):
        staged = self._staged(iter(self.loader))  # iter() here: the epoch's worker seeds are drawn now
        for batch, copied in self._from_thread(staged) if self.threaded else _one_ahead(staged):
            if copied is not None:
                compute = torch.cuda.current_stream(self.device)
                compute.wait_event(copied)  # this batch's copy and decode, not the ones queued after it
                for t in batch:
                    t.record_stream(compute)  # the allocator must not reuse it while the step runs
            yield batch

    def _staged(self, batches):
        """(batch on the device, event after its copy and finish) for each batch, the work queued on the side stream."""
        while True:
            with torch.cuda.stream(self.stream):  # a no-op for None (off CUDA)
                batch = next(batches, None)
                if batch is None:
                    return
                batch = tuple(t.to(self.device, non_blocking=True) for t in batch)
                if self.finish is not None:
                    batch = self.finish(batch)
                copied = None
                if self.stream is not None:
                    copied = torch.cuda.Event()
                    copied.record(self.stream)
            yield batch, copied

    def _from_thread(self, staged: Iterator) -> Iterator:
        ready: queue.Queue = queue.Queue(maxsize=self.depth)
        stop = threading.Event()
        producer = threading.Thread(target=self._produce, args=(staged, ready, stop), daemon=True, name="pfb-prefetch")
        producer.start()
        try:
            while (item := ready.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:  # also when the loop stops early: release the producer and wait for it
            stop.set()
            while producer.is_alive():
                with contextlib.suppress(queue.Empty):
                    ready.get_nowait()
                producer.join(timeout=0.05)

    def _produce(self, staged, ready: queue.Queue, stop: threading.Event) -> None:
        try:
            if self.stream is not None:
                torch.cuda.set_device(self.device)
            for item in staged:
                if not _put(ready, item, stop) or stop.is_set():
                    return  # the consumer stopped: read no further
            _put(ready, _END, stop)
        except BaseException as e:  # raised on the training thread, which called for the batch
            _put(ready, e, stop)


def _one_ahead(items):
    """Yield each item once the next one has been started (its copy queued before this step's kernels)."""
    upcoming = next(items, None)
    while upcoming is not None:
        current, upcoming = upcoming, next(items, None)
        yield current


def _put(ready: queue.Queue, item, stop: threading.Event) -> bool:
    """Queue `item` unless the consumer has stopped; False if it has."""
    while not stop.is_set():
        try:
            ready.put(item, timeout=0.05)
            return True
        except queue.Full:
            pass
    return False
