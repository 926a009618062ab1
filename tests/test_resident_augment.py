"""In-memory datasets made into batches on the training device (resident.py), here on the CPU:
batched pad-crop-flip by the per-item transforms' rule, draws from each sample's seed, the
DataLoader's order, subsets and resume offsets, and an exact resume of a training run."""

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from pfb_train.config import DataConfig, load_config
from pfb_train.data import build_datasets, build_loaders, set_loader_epoch
from pfb_train.data.augment import ImageRecipe, pad_crop_draws, pad_crop_flip
from pfb_train.data.loaders import TrainSampler
from pfb_train.data.resident import ResidentLoader, fits_on_device
from pfb_train.data.splits import DataSplits, TensorImages

MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)


def image_splits(n=40, channels=3, stored=12, size=12, padding=3, mean=MEAN, std=STD, classes=4):
    """Random uint8 images in memory, as cifar() or fashion_mnist() build them."""
    gen = torch.Generator().manual_seed(0)
    recipe = ImageRecipe(size, padding, mean, std)
    images = torch.randint(0, 256, (n, channels, stored, stored), dtype=torch.uint8, generator=gen)
    labels = torch.arange(n) % classes
    return DataSplits(
        TensorImages(images, labels, recipe, train=True),
        TensorImages(images[: n // 2], labels[: n // 2], recipe, train=False),
        classes,
    )


def loaders(splits, batch_size=4, world_size=1, rank=0, seed=5, channels_last=False):
    cfg = DataConfig(dataset="cifar10", img_size=splits.train.recipe.size, batch_size=batch_size, workers=0)
    return build_loaders(splits, cfg, seed=seed, rank=rank, world_size=world_size, channels_last=channels_last)


def by_index(loader):
    """{dataset index: image} over one pass of the loader."""
    return {i: x for xs, _, indices in loader for x, i in zip(xs, indices.tolist())}


def per_item(stored: torch.Tensor, recipe: ImageRecipe, draw) -> torch.Tensor:
    """The reference: torchvision's per-item ops (as in recipe.item_transform) with the given
    (top, left, flip) instead of RandomCrop's and RandomHorizontalFlip's own draws."""
    x = TF.resize(stored, [recipe.size], antialias=True) if stored.shape[-1] != recipe.size else stored
    if draw is not None:
        top, left, flip = draw.tolist()
        x = TF.crop(TF.pad(x, [recipe.padding]), top, left, recipe.size, recipe.size)
        x = TF.horizontal_flip(x) if flip else x
    x = TF.normalize(TF.to_dtype(x, torch.float32, scale=True), list(recipe.mean), list(recipe.std))
    return x.expand(3, -1, -1)


def test_crop_offsets_and_flips_follow_torchvisions_distribution():
    padding, n = 4, 20_000
    draws = pad_crop_draws(torch.arange(n) * 7919 + 11, padding)
    top, left, flip = draws.unbind(1)
    for offsets in (top, left):  # uniform on 0..2p, as RandomCrop's randint(0, H + 2p - size + 1)
        counts = torch.bincount(offsets, minlength=2 * padding + 1)
        assert len(counts) == 2 * padding + 1
        assert (counts - n / (2 * padding + 1)).abs().max() < 5 * (n / (2 * padding + 1)) ** 0.5
    assert abs(flip.float().mean() - 0.5) < 0.02
    assert abs(torch.corrcoef(torch.stack([top, left, flip]).double())[[0, 0, 1], [1, 2, 2]]).max() < 0.03
    # torchvision's own RandomCrop reaches the same offsets: pixel (p, p) of its crop is image pixel (top, left)
    coords = torch.arange(1, 16 * 16 + 1, dtype=torch.int32).view(1, 16, 16)
    crop = v2.RandomCrop(16, padding=padding)
    torch.manual_seed(0)
    tv = [divmod(int(crop(coords)[0, padding, padding]) - 1, 16) for _ in range(600)]
    assert {t for t, _ in tv} == {c for _, c in tv} == set(top.tolist()) == set(range(2 * padding + 1))


@pytest.mark.parametrize("channels", [1, 3])
def test_batched_pad_crop_flip_equals_the_per_item_ops(channels):
    gen = torch.Generator().manual_seed(1)
    images = torch.randint(1, 256, (30, channels, 10, 10), dtype=torch.uint8, generator=gen)
    index = torch.tensor([3, 0, 29, 3, 17, 8, 8, 21])
    draws = torch.tensor([[0, 0, 0], [4, 4, 1], [2, 0, 1], [0, 4, 0], [1, 3, 1], [3, 1, 0], [2, 2, 1], [4, 0, 0]])
    got = pad_crop_flip(images, index, draws, padding=2)
    assert got.shape == (8, channels, 10, 10) and got.dtype == torch.uint8
    for row, (i, (top, left, flip)) in enumerate(zip(index.tolist(), draws.tolist())):
        want = TF.crop(TF.pad(images[i], [2]), top, left, 10, 10)
        want = TF.horizontal_flip(want) if flip else want
        assert torch.equal(got[row], want), row
    # row 1 (offsets 4, 4 of padding 2, flipped): its last two rows and, flipped, first two columns are padding
    assert (got[1, :, -2:] == 0).all() and (got[1, :, :, :2] == 0).all() and (got[1, :, :-2, 2:] > 0).all()


@pytest.mark.parametrize(
    "channels,stored,size,padding,mean,std",
    [
        (3, 12, 12, 3, MEAN, STD),  # CIFAR-like at its own size
        (1, 14, 16, 16 // 14, (0.286,), (0.353,)),  # Fashion-MNIST-like, resized once (grey -> RGB)
    ],
)
def test_resident_batches_are_the_recipe_applied_with_each_samples_draws(channels, stored, size, padding, mean, std):
    splits = image_splits(channels=channels, stored=stored, size=size, padding=padding, mean=mean, std=std)
    train, val = loaders(splits, channels_last=True)
    assert isinstance(train, ResidentLoader) and isinstance(val, ResidentLoader)
    set_loader_epoch(train, 1)
    seeds = dict(train.sampler)  # (index, seed) keys
    recipe = splits.train.recipe
    for xs, ys, indices in train:
        assert xs.shape == (4, 3, size, size) and xs.dtype == torch.float32
        assert xs.is_contiguous(memory_format=torch.channels_last)
        draws = pad_crop_draws(torch.tensor([seeds[i] for i in indices.tolist()]), recipe.padding)
        for x, i, draw in zip(xs, indices.tolist(), draws):
            torch.testing.assert_close(x, per_item(splits.train.images[i], recipe, draw), rtol=0, atol=2e-6)
        assert torch.equal(ys, splits.train.labels[indices])
    for xs, _, indices in val:  # no augmentation
        for x, i in zip(xs, indices.tolist()):
            torch.testing.assert_close(x, per_item(splits.val.images[i], recipe, None), rtol=0, atol=2e-6)
            torch.testing.assert_close(x, splits.val[i][0], rtol=0, atol=2e-6)  # the workers' item


@pytest.mark.parametrize("skip", [0, 3])
def test_same_samples_labels_and_order_as_the_dataloader_with_a_subset_and_a_resume_offset(skip):
    splits = image_splits(n=40)
    train, val = loaders(splits)
    assert isinstance(train.loader, DataLoader)  # the DataLoader it wraps: per-item transforms in workers
    subset = torch.arange(1, 40, 2)  # what a sampler-level method (InfoBatch) hands over
    set_loader_epoch(train, 2, subset, skip)
    got, want = list(train), list(train.loader)
    assert len(got) == len(want) == len(train) == (20 - skip) // 4
    for (_, y, i), (_, y_items, i_items) in zip(got, want):
        assert torch.equal(i, i_items) and torch.equal(y, y_items)
    assert set(torch.cat([i for _, _, i in got]).tolist()) <= set(subset.tolist())
    assert [len(b[2]) for b in val] == [4, 4, 4, 4, 4]
    assert torch.equal(torch.cat([i for _, _, i in val]), torch.cat([i for _, _, i in val.loader]))


def test_a_samples_pixels_depend_on_seed_epoch_and_index_only():
    """Any batch size, rank split or resume inside the epoch gives a sample the same pixels."""
    splits = image_splits(n=48)
    train, _ = loaders(splits, batch_size=4)
    set_loader_epoch(train, 3)
    whole = by_index(train)
    assert len(whole) == 48
    other_batches, _ = loaders(splits, batch_size=6)
    set_loader_epoch(other_batches, 3)
    resumed, _ = loaders(splits, batch_size=4)
    set_loader_epoch(resumed, 3, None, 20)
    ranks = {}
    for rank in (0, 1):
        rank_loader, _ = loaders(splits, batch_size=4, world_size=2, rank=rank)
        set_loader_epoch(rank_loader, 3)
        ranks.update(by_index(rank_loader))
    for part in (by_index(other_batches), by_index(resumed), ranks):
        assert part and all(torch.equal(whole[i], x) for i, x in part.items())
    assert len(by_index(resumed)) == 28
    set_loader_epoch(train, 4)
    assert sum(torch.equal(whole[i], x) for i, x in by_index(train).items()) < 12  # new draws each epoch


def test_sample_seeds_give_the_keys_seeds():
    sampler = TrainSampler(30, seed=9)
    sampler.set_epoch(2)
    keys = list(sampler)
    assert torch.equal(sampler.sample_seeds(torch.tensor([k[0] for k in keys])), torch.tensor([k[1] for k in keys]))


def test_float_tensor_datasets_are_gathered_as_they_are():
    cfg = DataConfig(dataset="synthetic", img_size=8, batch_size=4, train_samples=16, val_samples=6, workers=0)
    splits = build_datasets(cfg, num_classes=3)
    train, val = build_loaders(splits, cfg, seed=0, channels_last=True)
    assert isinstance(train, ResidentLoader)
    set_loader_epoch(train, 0)
    for x, y, i in train:
        assert torch.equal(x, splits.train.tensors[0][i]) and torch.equal(y, splits.train.tensors[1][i])


def test_batches_make_the_host_wait_for_nothing():
    """After the epoch's order is set up, a batch is made without reading device memory on the host."""
    from helpers import HostReads

    train, _ = loaders(image_splits(n=40))
    set_loader_epoch(train, 0)
    batches = iter(train)
    next(batches)  # the epoch's order and draws: one copy per epoch
    with HostReads() as reads:
        rest = list(batches)
    assert len(rest) == 9 and reads.ops == []


def test_too_large_for_the_device_falls_back_to_the_dataloader(monkeypatch):
    import pfb_train.data.resident as resident

    splits = image_splits(n=40, stored=12, size=24)
    assert resident.resident_bytes(splits.train) == 40 * 3 * 24 * 24 + 40 * 8  # at the resized size
    assert fits_on_device(splits.train, torch.device("cpu"))
    assert not fits_on_device(TensorDataset(torch.zeros(4, 3)), torch.device("meta"))  # neither CPU nor CUDA
    monkeypatch.setattr(resident, "device_memory", lambda device: 4 * 40 * 3 * 24 * 24 - 1)
    assert not fits_on_device(splits.train, torch.device("cpu"))
    train, _ = loaders(splits)
    assert isinstance(train, DataLoader)
    x, _, _ = next(iter(train))
    assert x.shape == (4, 3, 24, 24) and x.dtype == torch.float32


def test_fashion_mnist_resume_inside_an_epoch_is_exact(tmp_path):
    """A run stopped mid-epoch and resumed ends bit-equal to an uninterrupted one, crops included."""
    from helpers import write_fashion_mnist
    from helpers import assert_same_training_state, final_state

    from pfb_train.distributed import DistInfo
    from pfb_train.train import fit, run, setup

    root = write_fashion_mnist(tmp_path / "fm", train_per_class=7)
    cfg = [
        "model.name=test_resnet",
        "data.dataset=fashion_mnist",
        f"data.root={root}",
        "data.img_size=28",
        "data.batch_size=16",
        "data.workers=0",
        "schedule.epochs=2",
        "schedule.warmup_epochs=0",
        "runtime.progress=false",
        "runtime.device=cpu",
        "blocking.method=pfb",
        "blocking.pfb.ratio=0.25",
        "blocking.random.ratio=0.25",
        "blocking.infobatch.prune_ratio=0.25",
        "blocking.static_random.drop_fraction=0.25",
        "blocking.pfb.centres=4",
        "runtime.checkpoint_every=3",
        "name=fm",
    ]  # 70 images: 4 steps per epoch
    whole = run(load_config(None, [*cfg, f"runtime.output={tmp_path}/a"]))
    first = setup(load_config(None, [*cfg, f"runtime.output={tmp_path}/b"]), DistInfo())
    assert isinstance(first.train_loader, ResidentLoader) and first.train_loader.padding == 2
    fit(first, until_step=6)  # epoch 1, batch 2 of 4
    assert (final_state(first.run_dir)["epoch"], final_state(first.run_dir)["step"]) == (1, 6)
    resumed = run(load_config(None, [*cfg, f"runtime.output={tmp_path}/b", "runtime.resume=auto"]))
    assert_same_training_state(final_state(whole["run_dir"]), final_state(resumed["run_dir"]))


@pytest.mark.gpu
def test_on_a_gpu_the_batches_equal_the_cpus():
    splits = image_splits(n=40, channels=1, stored=14, size=16, padding=1, mean=(0.286,), std=(0.353,))
    cfg = DataConfig(dataset="fashion_mnist", img_size=16, batch_size=4, workers=0)
    gpu, gpu_val = build_loaders(splits, cfg, seed=5, device="cuda", channels_last=True)
    cpu, cpu_val = build_loaders(splits, cfg, seed=5, device="cpu", channels_last=True)
    assert isinstance(gpu, ResidentLoader) and gpu.images.is_cuda and gpu.images.dtype == torch.uint8
    set_loader_epoch(gpu, 1, torch.arange(0, 40, 2), 1)
    set_loader_epoch(cpu, 1, torch.arange(0, 40, 2), 1)
    for (xg, yg, ig), (xc, yc, ic) in [*zip(gpu, cpu, strict=True), *zip(gpu_val, cpu_val, strict=True)]:
        assert xg.is_cuda and xg.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(ig.cpu(), ic) and torch.equal(yg.cpu(), yc)
        torch.testing.assert_close(xg.cpu(), xc, rtol=0, atol=1e-6)
