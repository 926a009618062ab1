"""The cpu decode path: workers ship uint8 batches, the training device normalises them (normalize.py)."""

import random

import numpy as np
import pytest
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from torch.utils.data import DataLoader
from torchvision.datasets.folder import default_loader

from helpers import write_smooth_folder
from pfb_train.config import DataConfig
from pfb_train.data import build_datasets, build_loaders, set_loader_epoch
from pfb_train.data.missing import stand_in_index
from pfb_train.data.normalize import Normalize, NormalizingLoader
from pfb_train.data.prefetch import DevicePrefetcher


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("jpegs")
    write_smooth_folder(root, per_class=6, size=lambda i: (30 + 4 * i, 40))
    return root


def cpu_loaders(root, workers=0, **kw):
    cfg = DataConfig(dataset="imagefolder", root=str(root), img_size=24, batch_size=4, workers=workers)
    splits = build_datasets(cfg)
    return splits, *build_loaders(splits, cfg, seed=3, **kw)


@pytest.fixture
def global_rng():
    """The test seeds the global RNGs as a worker does; leave them as they were."""
    state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    yield
    random.setstate(state[0])
    np.random.set_state(state[1])
    torch.set_rng_state(state[2])


def test_workers_ship_uint8_a_quarter_of_float32s_bytes(folder):
    splits, train, val = cpu_loaders(folder)
    assert isinstance(train, NormalizingLoader) and isinstance(train.loader, DataLoader)
    assert (splits.mean, splits.std) == (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    set_loader_epoch(train, 0)
    shipped, _, _ = next(iter(train.loader))
    made, _, _ = next(iter(train))
    assert shipped.dtype == torch.uint8 and shipped.shape == (4, 3, 24, 24)
    assert made.dtype == torch.float32 and made.shape == (4, 3, 24, 24)
    assert 4 * shipped.numel() * shipped.element_size() == made.numel() * made.element_size()


def test_normalised_batches_equal_the_old_float_path(folder, global_rng):
    """Same crops (the sample's seed), same pixels as timm's float transform in the workers gave."""
    splits, train, val = cpu_loaders(folder, workers=1)
    old_train, old_val = create_transform(24, is_training=True), create_transform(24, is_training=False)
    set_loader_epoch(train, 1)
    seeds = dict(train.sampler)  # (index, seed) keys
    compared = 0
    for xs, _, indices in train:
        for x, i in zip(xs, indices.tolist()):
            random.seed(seeds[i])  # what IndexedDataset does in a worker before making the item
            np.random.seed(seeds[i] % 2**32)
            torch.default_generator.manual_seed(seeds[i])
            want = old_train(default_loader(splits.train.samples[i][0]))
            torch.testing.assert_close(x, want, rtol=0, atol=1e-5)
            compared += 1
    for xs, _, indices in val:
        for x, i in zip(xs, indices.tolist()):
            torch.testing.assert_close(x, old_val(default_loader(splits.val.samples[i][0])), rtol=0, atol=1e-5)
            compared += 1
    assert compared == 12 + 12


def test_channels_last_and_the_prefetcher_side_run_the_same_normalisation(folder):
    _, _, plain = cpu_loaders(folder)  # validation: no random draws, so the three runs can be compared
    _, _, last = cpu_loaders(folder, channels_last=True)
    prefetched = DevicePrefetcher(plain.loader, "cpu", threaded=True, finish=plain.normalize)  # as on CUDA
    for (a, _, ia), (b, _, ib), (c, _, ic) in zip(plain, last, prefetched, strict=True):
        assert b.is_contiguous(memory_format=torch.channels_last) and not a.is_contiguous(
            memory_format=torch.channels_last
        )
        assert torch.equal(a, b) and torch.equal(a, c) and torch.equal(ia, ib) and torch.equal(ia, ic)


def test_float_batches_keep_their_values_and_grey_becomes_rgb():
    normalize = Normalize((0.5,), (0.25,), channels_last=True)
    decoded = torch.randn(2, 3, 4, 4)  # device decoding and DALI hand over normalised float batches
    labels = torch.tensor([0, 1])
    assert Normalize((0.5,), (0.25,))((decoded, labels, labels))[0] is decoded  # no copy without a format to set
    out = normalize((decoded, labels, labels))[0]  # the loaders own the memory format: the step takes it as it is
    assert out.is_contiguous(memory_format=torch.channels_last) and torch.equal(out, decoded)
    assert Normalize(None, None, channels_last=True).images(decoded).is_contiguous(memory_format=torch.channels_last)
    grey = torch.randint(0, 256, (2, 1, 4, 4), dtype=torch.uint8)
    out = normalize.images(grey)
    assert out.shape == (2, 3, 4, 4) and out.is_contiguous(memory_format=torch.channels_last)
    want = (grey.float() / 255 - 0.5) / 0.25
    for c in range(3):
        torch.testing.assert_close(out[:, c : c + 1], want, rtol=0, atol=1e-6)


def test_stand_ins_for_unreadable_files_are_uint8_copies_of_a_readable_item(tmp_path):
    write_smooth_folder(tmp_path, per_class=2)
    (tmp_path / "val" / "a" / "1.jpg").write_bytes(b"not a jpeg")
    _, _, val = cpu_loaders(tmp_path)
    shipped, labels, indices = next(iter(val.loader))
    assert shipped.dtype == torch.uint8 and (indices < 0).sum() == 1
    stand_in = indices.tolist().index(stand_in_index(1))  # val/a/1.jpg is sample 1: the stand-in names it
    assert any(
        torch.equal(shipped[stand_in], shipped[j]) and labels[stand_in] == labels[j]
        for j in range(len(indices))
        if j != stand_in
    )
    made, _, made_idx = next(iter(val))
    assert made.dtype == torch.float32 and torch.isfinite(made).all() and torch.equal(made_idx, indices)


@pytest.mark.gpu
def test_on_a_gpu_uint8_is_copied_and_normalised_on_the_side_stream(folder):
    _, gpu_train, gpu_val = cpu_loaders(folder, workers=1, device="cuda", pin_memory=True, channels_last=True)
    _, cpu_train, cpu_val = cpu_loaders(folder, workers=1, channels_last=True)
    assert isinstance(gpu_train, DevicePrefetcher) and isinstance(gpu_train.finish, Normalize)
    set_loader_epoch(gpu_train, 1)
    set_loader_epoch(cpu_train, 1)
    for (xg, yg, ig), (xc, yc, ic) in [*zip(gpu_train, cpu_train, strict=True), *zip(gpu_val, cpu_val, strict=True)]:
        xg = xg * 1.0  # a kernel on the compute stream must see the finished batch
        assert xg.is_cuda and xg.dtype == torch.float32 and torch.equal(ig.cpu(), ic) and torch.equal(yg.cpu(), yc)
        torch.testing.assert_close(xg.cpu(), xc, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dataset", ["imagefolder", "synthetic", "digits"])
def test_loaders_hand_over_batches_in_the_memory_format_asked(tmp_path, dataset):
    """The loaders own the memory format (the step takes batches as they come): files decoded by workers,
    float in-memory sets and uint8 in-memory sets all come channels_last when asked."""
    write_smooth_folder(tmp_path, per_class=4)
    cfg = DataConfig(dataset=dataset, root=str(tmp_path), img_size=16, batch_size=4, workers=0, train_samples=8)
    splits = build_datasets(cfg)
    for loader in build_loaders(splits, cfg, seed=0, channels_last=True):
        x, _, _ = next(iter(loader))
        assert x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last)
        assert not x.is_contiguous()  # (4, 3, 16, 16) channels_last is not also the default layout
