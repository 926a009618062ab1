"""ImageNet input decoded on the training device (`data.decode: device`).

DataLoader workers only read file bytes. The main process hands a whole batch of JPEGs to
torchvision's batched `decode_jpeg(device=...)` (nvJPEG on a GPU), then crops, resizes,
flips and normalises there: a 224-px batch leaves the host as ~30 KB per image of JPEG
instead of 150 KB of pixels, and no CPU core decodes or resizes. Other formats (PNG, ...)
are decoded on the CPU one by one and moved; unreadable files are dropped from the batch
(counted by the engine as a shorter batch) or, with `data.bad_images: fail`, stop the run.

Train: RandomResizedCrop(scale 0.08-1, ratio 3/4-4/3) + horizontal flip; eval: resize the
shorter side to size / crop_pct, centre crop. Crop boxes come from torchvision's own
`RandomResizedCrop.get_params`, run on a forked RNG seeded from the loader's generator, so
the global RNG (dropout, mixup) is untouched and an epoch's crops depend on its seed only.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import default_collate
from torchvision.io import ImageReadMode, decode_image, decode_jpeg
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from pfb_train.errors import UserError
from pfb_train.wrapped_loader import WrappedLoader

JPEG_MAGIC = (0xFF, 0xD8)


def read_bytes(path: str) -> torch.Tensor:
    """A file's bytes as a uint8 tensor (empty if it cannot be read: decoding then counts it as bad)."""
    try:
        with open(path, "rb") as f:
            return torch.from_numpy(np.frombuffer(f.read(), dtype=np.uint8).copy())
    except OSError:
        return torch.empty(0, dtype=torch.uint8)


def collate_bytes(items):
    """(file bytes, label, index) items -> (list of byte tensors, labels, indices)."""
    data = [item[0] for item in items]
    labels, indices = default_collate([(item[1], item[2]) for item in items])
    return data, labels, indices


def _is_jpeg(data: torch.Tensor) -> bool:
    return data.numel() > 2 and (int(data[0]), int(data[1])) == JPEG_MAGIC


class DeviceDecodeLoader(WrappedLoader):
    """Wraps a DataLoader of file bytes; yields (images on `device`, labels, indices) like the CPU loader."""

    def __init__(self, loader, device, img_size: int, train: bool, mean, std, crop_pct: float = 0.875,
                 fail_on_bad: bool = False, paths=None):
        super().__init__(loader)
        self.device, self.img_size, self.train = torch.device(device), img_size, train
        self.crop_pct, self.fail_on_bad, self.paths = crop_pct, fail_on_bad, paths
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1) * 255
        # The loader's generator (re-seeded per epoch by data.start_epoch) also draws the crops.
        self.crop_generator = loader.generator if loader.generator is not None else torch.Generator()

    def __iter__(self):
        for data, labels, indices in self.loader:
            images, good = self.decode(data, indices)
            if not good.all():
                labels, indices = labels[good], indices[good]
            yield self.augment(images), labels, indices

    def decode(self, data: list, indices: torch.Tensor) -> tuple[list, torch.Tensor]:
        """Decoded CHW uint8 images on the device, and which items decoded."""
        jpeg = [i for i, d in enumerate(data) if _is_jpeg(d)]
        images: list = [None] * len(data)
        try:  # one batched call for all JPEGs; a broken file fails it, then decode one by one
            decoded = decode_jpeg([data[i] for i in jpeg], mode=ImageReadMode.RGB, device=self.device) if jpeg else []
            for i, image in zip(jpeg, decoded):
                images[i] = image
            rest = sorted(set(range(len(data))) - set(jpeg))
        except RuntimeError:
            rest = list(range(len(data)))
        for i in rest:
            images[i] = self._decode_one(data[i], int(indices[i]))
        good = torch.tensor([image is not None for image in images])
        return [image for image in images if image is not None], good

    def _decode_one(self, data: torch.Tensor, index: int):
        try:
            if data.numel() == 0:
                raise RuntimeError("empty or unreadable file")
            if _is_jpeg(data):
                return decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
            return decode_image(data, mode=ImageReadMode.RGB).to(self.device, non_blocking=True)
        except RuntimeError as e:
            if self.fail_on_bad:
                where = self.paths[index] if self.paths is not None else f"sample {index}"
                raise UserError(f"unreadable image {where} ({type(e).__name__}); set data.bad_images=skip "
                                "to skip such files") from None
            return None

    def augment(self, images: list) -> torch.Tensor:
        size = [self.img_size, self.img_size]
        if self.train:
            with torch.random.fork_rng(devices=[]):  # torchvision draws from the global RNG: give it our seed
                torch.manual_seed(int(torch.randint(2**62, (1,), generator=self.crop_generator)))
                boxes = [v2.RandomResizedCrop.get_params(image, [0.08, 1.0], [3 / 4, 4 / 3]) for image in images]
                flips = torch.rand(len(images)) < 0.5
            out = [TF.resized_crop(image, *box, size, antialias=True) for image, box in zip(images, boxes)]
            batch = torch.stack(out)
            if self.device.type == "cuda":  # a pageable copy would make the host wait for the stream
                flips = flips.pin_memory()
            flips = flips.to(self.device, non_blocking=True)
            batch = torch.where(flips.view(-1, 1, 1, 1), batch.flip(-1), batch)
        else:
            resize = int(self.img_size / self.crop_pct)
            batch = torch.stack([TF.center_crop(TF.resize(image, resize, antialias=True), size) for image in images])
        return (batch.float() - self.mean) / self.std
