"""Loaders: every batch is (images, labels, dataset indices of its samples), the same on every run
of a seed. Train order is shuffled per epoch and split over ranks (TrainSampler). In-memory
datasets are made into batches on the training device (resident.py); on CUDA the other loaders'
batches arrive there staged ahead (prefetch.py), uint8 ones normalised after the copy (normalize.py)."""

from __future__ import annotations

import dataclasses
import os
import random
from typing import Optional, cast

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate, get_worker_info

from pfb_train.data.dali import DaliLoader, collate_sized_bytes
from pfb_train.data.device_decode import DeviceDecodeLoader, collate_bytes
from pfb_train.data.missing import Unreadable, fill_unreadable, stand_in_index
from pfb_train.data.normalize import Normalize, NormalizingLoader
from pfb_train.data.prefetch import DevicePrefetcher
from pfb_train.data.resident import ResidentLoader, fits_on_device
from pfb_train.data.splits import DataSplits, SizedDataset, imagenet_stats, sample_names
from pfb_train.data.wds import ShardedTars, local_shuffle, shard_stream
from pfb_train.errors import UserError
from pfb_train.preemption import StopSafeDataLoader
from pfb_train.seeding import derive_seed


def collate_readable(items):
    """Default collation, unreadable items replaced by stand-ins (missing.fill_unreadable)."""
    return default_collate(fill_unreadable(items, lambda item, bad: (*item[:-1], stand_in_index(bad.index))))


class IndexedDataset(Dataset):
    """Wraps a dataset of (image, label) so items are (image, label, index).

    Keys are an index, or (index, seed) from the train sampler. In a DataLoader worker the
    seed restarts the RNGs the transforms draw from (Python's, NumPy's, torch's) before the
    sample is made, so its augmentation depends on (run seed, epoch, index) alone: not on
    which worker makes it, how many there are, or whether the run was resumed and its
    workers restarted. In the training process (`workers: 0`) the transforms draw from the
    run's own streams instead, which checkpoints save and restore."""

    def __init__(self, dataset: SizedDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, None)
        if seed is not None and get_worker_info() is not None:
            random.seed(seed)
            np.random.seed(seed % 2**32)
            torch.default_generator.manual_seed(seed)  # torch.manual_seed also visits every accelerator: 80 us
        item = self.dataset[index]
        return dataclasses.replace(item, index=index) if isinstance(item, Unreadable) else (*item, index)


class TrainSampler(Sampler):
    """Shuffled each epoch and split over ranks, like DistributedSampler(drop_last=True), but able to
    visit a subset (sampler-level selection). The subset and the shuffle are the same on every rank."""

    def __init__(self, size: int, rank: int = 0, world_size: int = 1, seed: int = 0):
        self.size, self.rank, self.world_size, self.seed = size, rank, world_size, seed
        self.epoch, self.skip = 0, 0
        self.subset: torch.Tensor | None = None  # set_epoch's

    def set_epoch(self, epoch: int, subset: torch.Tensor | None = None, skip: int = 0) -> None:
        """`subset`: dataset indices to visit this epoch (None: all of them); `skip`: the first `skip`
        samples of the epoch's order, over all ranks, were already trained on (resuming inside the
        epoch). Counted in samples, not batches, so a resume may change the batch size or, here
        (not for tar shards), the number of processes."""
        self.epoch, self.subset, self.skip = epoch, subset, skip

    def _pool(self) -> int:
        return self.size if self.subset is None else len(self.subset)

    def __iter__(self):
        """Keys (dataset index, that sample's augmentation seed this epoch): see IndexedDataset."""
        generator = torch.Generator().manual_seed(derive_seed("shuffle", self.seed, self.epoch))
        order = torch.randperm(self._pool(), generator=generator)
        indices = (order if self.subset is None else self.subset.cpu()[order])[self.skip :]
        indices = indices[: self._share() * self.world_size]  # equal shares: every rank takes as many steps
        # Rank r takes places r, r + W, ...: after n steps of b rows each, the first n b W places are
        # done whatever the rank, which is what makes `skip` one number for every rank.
        return self._keys(indices[self.rank :: self.world_size])

    def _keys(self, mine: torch.Tensor):
        return zip(mine.tolist(), self.sample_seeds(mine).tolist())

    def sample_seeds(self, indices: torch.Tensor) -> torch.Tensor:
        """The augmentation seed of each dataset index this epoch (int64, shape of `indices`): a function
        of (run seed, epoch, index) only, so any worker, rank or resumed run draws the same for a sample."""
        base = derive_seed("augment", self.seed, self.epoch) % 2**62  # unrelated per (seed, epoch)
        return (indices.long().cpu() + base) % 2**62

    def _share(self) -> int:
        """Samples this rank visits from here to the end of the epoch."""
        return (self._pool() - self.skip) // self.world_size

    def __len__(self) -> int:
        return self._share()


class ShardStreamSampler(TrainSampler):
    """TrainSampler's contract for tar shards (data/wds.py): the epoch's shards laid end to end
    in a seeded order, pruned samples taken out, an equal contiguous piece per rank (whole batches:
    every rank takes as many steps; the rest waits at the end of the stream), shuffled within
    `window` places so that reads stay within a few neighbouring shards."""

    def __init__(self, shard_lengths, batch_size: int, window: int, rank: int = 0, world_size: int = 1, seed: int = 0):
        super().__init__(sum(shard_lengths), rank, world_size, seed)
        self.shard_lengths, self.batch_size, self.window = list(shard_lengths), batch_size, window

    def __iter__(self):
        stream = torch.from_numpy(shard_stream(self.shard_lengths, self.seed, self.epoch))
        if self.subset is not None:
            kept = torch.zeros(self.size, dtype=torch.bool)
            kept[self.subset.cpu()] = True
            stream = stream[kept[stream]]
        share = self._whole_share()
        mine = stream[self.rank * share : (self.rank + 1) * share]
        generator = torch.Generator().manual_seed(derive_seed("local shuffle", self.seed, self.epoch, self.rank))
        # Each rank reads its own contiguous part: a resume inside the epoch keeps the batch size and
        # the number of processes (train.py refuses others), so `skip` is every rank's done share.
        return self._keys(mine[local_shuffle(len(mine), self.window, generator)][self.skip // self.world_size :])

    def _whole_share(self) -> int:
        return self._pool() // (self.world_size * self.batch_size) * self.batch_size

    def _share(self) -> int:
        return self._whole_share() - self.skip // self.world_size


class EvalSampler(Sampler):
    """Rank r visits one contiguous block of indices, the blocks differing by at most one in size:
    every sample exactly once over all ranks (no padding), and reads of neighbouring samples."""

    def __init__(self, size: int, rank: int, world_size: int):
        self.indices = range(size * rank // world_size, size * (rank + 1) // world_size)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def build_loaders(
    splits: DataSplits,
    data_cfg,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    pin_memory=False,
    device="cpu",
    channels_last: bool = False,
    accum_steps: int = 1,
):
    """Train loader: shuffled per epoch (`loader.sampler.set_epoch(epoch, subset)`), fixed batch size (drop_last).
    On CUDA both loaders yield batches already on the device, staged ahead on a side stream. In-memory
    datasets that fit are served from the device (resident.py, also on the CPU). uint8 images (the cpu
    decode path, CIFAR, Fashion-MNIST) become normalised float32 on the device (normalize.py). Every
    batch comes in the memory format `channels_last` asks for: the loaders are the one owner of device
    placement and memory format, and the training step takes batches as they come. A training batch holds
    one optimizer step's rows: `accum_steps` micro-batches of data.batch_size (the step splits them). Raises
    UserError for a training set smaller than one global batch."""
    d = dataclasses.replace(data_cfg, workers=loader_workers(data_cfg.workers))
    if len(splits.train) < d.batch_size * accum_steps * world_size:
        accum = f" x optim.accum_steps {accum_steps}" if accum_steps > 1 else ""
        raise UserError(
            f"training set has {len(splits.train)} samples, fewer than one global batch "
            f"(data.batch_size {d.batch_size} x {world_size} processes{accum})"
        )
    train, val = torch_loaders(splits, d, seed, rank, world_size, pin_memory, accum_steps)
    if splits.decode_on_device:
        wrap = dict(device=device, img_size=d.img_size, fail_on_bad=d.bad_images == "fail", **imagenet_stats())
        if d.decode == "dali":  # DaliLoader imports DALI (an optional extra) when it is made
            # DALI's CPU threads (decoding without a GPU, cropping) as many as the workers asked for
            wrap.update(threads=max(1, d.workers), channels_last=channels_last)
            decoder: type[DaliLoader] | type[DeviceDecodeLoader] = DaliLoader
        else:
            decoder = DeviceDecodeLoader
        train = decoder(train, train=True, paths=sample_names(splits.train), **wrap)
        val = decoder(val, train=False, paths=sample_names(splits.val), **wrap)
    target = torch.device(device)
    if fits_on_device(splits.train, target) and fits_on_device(splits.val, target):  # in-memory: batches made there
        return (
            ResidentLoader(train, splits.train, target, channels_last),
            ResidentLoader(val, splits.val, target, channels_last),
        )
    # uint8 items (the cpu decode path) become normalised float32 on the training device, after the copy
    normalize = None
    if splits.mean is not None or channels_last:
        normalize = Normalize(splits.mean, splits.std, channels_last)
    if target.type == "cuda":  # copies (and device decoding, normalising) of the next batches overlap this step
        # A producer thread only where making a batch draws from no global RNG (see prefetch.py).
        threaded = d.workers > 0 or splits.decode_on_device
        return (
            DevicePrefetcher(train, device, threaded, finish=normalize),
            DevicePrefetcher(val, device, threaded, finish=normalize),
        )
    if normalize is not None:
        return NormalizingLoader(train, normalize), NormalizingLoader(val, normalize)
    return train, val


MAX_AUTO_WORKERS = 8  # enough to decode ImageNet JPEGs for one GPU's step (docs/speed.md); more only cost memory


def loader_workers(requested: Optional[int]) -> int:
    """DataLoader workers per process: `requested`, or (None) this process's share of the CPUs it may run on
    (the processes of its node, torchrun's LOCAL_WORLD_SIZE, share them) less one for the training process
    itself, at most MAX_AUTO_WORKERS."""
    if requested is not None:
        return requested
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    share = cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(0, min(MAX_AUTO_WORKERS, share - 1))


def torch_loaders(splits: DataSplits, d, seed: int, rank: int, world_size: int, pin_memory: bool, accum_steps: int):
    """The (train, val) DataLoaders over the splits, before any device-side wrapping: this rank's shard of
    each epoch's order (TrainSampler, or ShardStreamSampler for WebDataset shards) and of the validation set."""
    train_sampler: TrainSampler
    if isinstance(splits.train, ShardedTars):
        train_sampler = ShardStreamSampler(
            splits.train.shard_lengths, d.batch_size * accum_steps, d.shuffle_window, rank, world_size, seed
        )
    else:
        train_sampler = TrainSampler(len(splits.train), rank, world_size, seed)
    collate = collate_readable
    if splits.decode_on_device:  # workers read bytes; DALI also needs each image's size, read from its header
        collate = collate_sized_bytes if d.decode == "dali" else collate_bytes
        pin_memory = pin_memory and d.decode != "dali"  # DALI reads host memory itself: pinning would only copy
    common = dict(num_workers=d.workers, pin_memory=pin_memory, persistent_workers=d.workers > 0, collate_fn=collate)
    # Its own generator: worker seeds are drawn from it, not from the global RNG (see set_loader_epoch).
    # StopSafeDataLoader: workers outlive a SIGTERM sent to the whole job, so the run can checkpoint.
    train = StopSafeDataLoader(
        IndexedDataset(splits.train),
        batch_size=d.batch_size * accum_steps,
        sampler=train_sampler,
        drop_last=True,
        generator=torch.Generator(),
        **common,
    )
    val = StopSafeDataLoader(
        IndexedDataset(splits.val),
        batch_size=d.eval_batch_size or d.batch_size,
        sampler=EvalSampler(len(splits.val), rank, world_size),
        **common,
    )
    return train, val


def set_loader_epoch(loader: DataLoader, epoch: int, subset: torch.Tensor | None = None, skip: int = 0) -> None:
    """Point the train loader at an epoch: its sampler's order and subset, and the seed its iterator
    draws for the workers. That seed depends on (run seed, rank, epoch) only, so creating the
    iterator leaves the global RNG alone and a resumed epoch draws what the original one did."""
    sampler = cast(TrainSampler, loader.sampler)  # the train loader's (torch_loaders)
    sampler.set_epoch(epoch, subset, skip)
    loader.generator.manual_seed(derive_seed("workers", sampler.seed, sampler.rank, epoch))
