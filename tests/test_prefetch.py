"""The prefetcher's producer thread, run on the CPU (the CUDA stream and events: test_gpu.py)."""

import threading
import time

import pytest
import torch

from pfb_train.config import DataConfig
from pfb_train.data import build_datasets, build_loaders, set_loader_epoch
from pfb_train.errors import UserError
from pfb_train.data.prefetch import DevicePrefetcher


@pytest.fixture
def train_loader():
    cfg = DataConfig(dataset="synthetic", img_size=8, batch_size=4, train_samples=32, val_samples=8, workers=0)
    return build_loaders(build_datasets(cfg, num_classes=3), cfg, seed=0)[0]


class Recording:
    """A loader that records each batch as it is drawn from it, and can fail after `fail_after` batches."""

    def __init__(self, loader, fail_after=None):
        self.loader, self.fail_after, self.fetched = loader, fail_after, []
        self.sampler, self.generator, self.batch_size = loader.sampler, loader.generator, loader.batch_size

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            if len(self.fetched) == self.fail_after:
                raise UserError("unreadable image broken.jpg")
            self.fetched.append(batch[2])
            yield batch


def wait_for(condition, seconds=10.0):
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def producers_alive():
    return any(t.name == "pfb-prefetch" and t.is_alive() for t in threading.enumerate())


def test_same_batches_in_order_read_ahead_at_most_depth(train_loader):
    recording = Recording(train_loader)
    prefetcher = DevicePrefetcher(recording, "cpu", depth=2)
    assert (len(prefetcher), prefetcher.batch_size, prefetcher.sampler, prefetcher.generator) == (
        8,
        4,
        train_loader.sampler,
        train_loader.generator,
    )
    set_loader_epoch(prefetcher, 1)
    seen = []
    for i, (_, _, indices) in enumerate(prefetcher):
        seen.append(indices)
        if i == 0:  # while this step "runs", the producer fills the queue (2) and holds one more
            assert wait_for(lambda: len(recording.fetched) == 4)
            time.sleep(0.05)
        assert len(recording.fetched) <= len(seen) + 3
    set_loader_epoch(train_loader, 1)
    assert all(torch.equal(a, b) for a, b in zip(seen, [indices for _, _, indices in train_loader], strict=True))
    assert wait_for(lambda: not producers_alive())


def test_loader_errors_reach_the_training_thread(train_loader):
    prefetcher = DevicePrefetcher(Recording(train_loader, fail_after=3), "cpu")
    set_loader_epoch(prefetcher, 0)
    got = []
    with pytest.raises(UserError, match="broken.jpg"):
        for batch in prefetcher:
            got.append(batch)
    assert len(got) == 3
    assert not producers_alive()


def test_stopping_early_ends_the_producer(train_loader):
    recording = Recording(train_loader)
    prefetcher = DevicePrefetcher(recording, "cpu", depth=1)
    set_loader_epoch(prefetcher, 0)
    for _ in prefetcher:
        assert wait_for(lambda: len(recording.fetched) == 3)  # 1 taken, 1 queued, 1 waiting to be queued
        break
    assert not producers_alive()  # the loop's exit closed the generator, which joined the thread
    assert len(recording.fetched) == 3
    assert [indices for _, _, indices in prefetcher]  # and the next epoch starts afresh


def test_without_a_thread_the_next_batch_is_staged_one_ahead(train_loader):
    """Used where the loader's transforms draw from the global RNG on the training thread."""
    recording = Recording(train_loader)
    prefetcher = DevicePrefetcher(recording, "cpu", threaded=False)
    set_loader_epoch(prefetcher, 1)
    seen = []
    for _, _, indices in prefetcher:
        seen.append(indices)
        assert len(recording.fetched) == min(len(seen) + 1, 8)  # exactly one ahead, fetched on this thread
        assert not producers_alive()
    set_loader_epoch(train_loader, 1)
    assert all(torch.equal(a, b) for a, b in zip(seen, [indices for _, _, indices in train_loader], strict=True))


def test_a_producer_thread_only_where_batches_draw_from_no_global_rng(tmp_path):
    """In-process CPU transforms (workers=0) would share the global RNG with mixup on a second thread."""
    from helpers import write_smooth_folder

    write_smooth_folder(tmp_path, per_class=4)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.cuda, "Stream", lambda device: None)  # build the CUDA wrappers without a GPU
        patch.setattr(torch.cuda, "current_device", lambda: 0)
        for workers, threaded in [(0, False), (2, True)]:  # data.decode=device: always threaded (test_gpu.py)
            cfg = DataConfig(dataset="imagefolder", root=str(tmp_path), img_size=32, batch_size=4, workers=workers)
            train, val = build_loaders(build_datasets(cfg), cfg, seed=0, device="cuda")
            assert isinstance(train, DevicePrefetcher) and (train.threaded, val.threaded) == (threaded, threaded)


@pytest.mark.parametrize("skip", [0, 3])
def test_resident_loader_gathers_what_the_dataloader_yields(skip):
    """Same batches, order, subset and resume offset as the worker path (here on the CPU)."""
    from pfb_train.data.resident import ResidentLoader

    cfg = DataConfig(dataset="synthetic", img_size=8, batch_size=4, train_samples=40, val_samples=10, workers=0)
    splits = build_datasets(cfg, num_classes=3)
    plain, val = build_loaders(splits, cfg, seed=5)
    resident = ResidentLoader(build_loaders(splits, cfg, seed=5)[0], splits.train, torch.device("cpu"))
    subset = torch.arange(0, 40, 2)
    set_loader_epoch(plain, 2, subset, skip)
    set_loader_epoch(resident, 2, subset, skip)
    got, want = list(resident), list(plain)
    assert len(got) == len(want) == len(resident) == (20 - skip) // 4
    for a, b in zip(got, want):
        assert all(torch.equal(u, v) for u, v in zip(a, b))
    resident_val = ResidentLoader(val, splits.val, torch.device("cpu"))
    assert [len(b[0]) for b in resident_val] == [4, 4, 2]  # the last, partial batch is kept
