"""ImageNet input decoded on the training device (`data.decode: device`).

DataLoader workers only read file bytes. The training process (on a GPU, its prefetch
thread: prefetch.py) hands a whole batch of JPEGs to torchvision's batched
`decode_jpeg(device=...)` (nvJPEG on a GPU), then crops, resizes, flips and normalises
there: a 224-px batch leaves the host as ~30 KB per image of JPEG instead of 150 KB of
pixels, and no CPU core decodes or resizes. Other formats (PNG, ...) are decoded on the CPU
one by one by torchvision.io (16-bit PNG: its top 8 bits) and moved; formats torchvision.io does
not read (BMP, TIFF, PPM, ...) by PIL, decode.py's rule, as the `cpu` path does. The workers read
each image's header first (decode.py's `check_size`): an image of more than decode.MAX_PIXELS
pixels is never decoded. An unreadable file is replaced by a readable image of its batch with a
negative index (see missing.fill_unreadable: batches keep their size) or, with `data.bad_images: fail`,
stops the run.

Train: RandomResizedCrop(scale 0.08-1, ratio 3/4-4/3) + horizontal flip; eval: resize the
shorter side to size / crop_pct, centre crop. The crop boxes and flips of a whole batch are
drawn at once (`random_resized_boxes`, torchvision's RandomResizedCrop rule vectorised) from
the loader's generator: a few tensor ops per batch instead of ~40 Python-level RNG calls per
image, the global RNG (dropout, mixup) untouched, and an epoch's crops set by its seed alone.
Each crop is a view of its decoded image, resized by one antialiased bilinear interpolation.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import default_collate
from torchvision.io import ImageReadMode, decode_image, decode_jpeg
from torchvision.transforms.v2 import functional as TF

from pfb_train.data.decode import BadImage, TooLarge, check_size, rgb_tensor, top_byte
from pfb_train.data.missing import Unreadable, all_unreadable, skip_or_fail, stand_in_index, stand_in_rows
from pfb_train.errors import UserError, squeezed
from pfb_train.data.wrapped import WrappedLoader

JPEG_MAGIC = (0xFF, 0xD8)


def read_bytes(path: str) -> torch.Tensor:
    """A file's bytes as a uint8 tensor (empty if it cannot be read: decoding then counts it as bad)."""
    try:
        with open(path, "rb") as f:
            return torch.from_numpy(np.frombuffer(f.read(), dtype=np.uint8).copy())
    except OSError:
        return torch.empty(0, dtype=torch.uint8)


def stack_bytes(items):
    """(file bytes, label, index) items -> (list of byte tensors, labels, indices), nothing checked."""
    data = [item[0] for item in items]
    labels, indices = default_collate([(item[1], item[2]) for item in items])
    return data, labels, indices


def collate_bytes(items):
    """(file bytes, label, index) items -> (list of byte tensors, labels, indices), in the workers.

    An image whose header claims more than decode.MAX_PIXELS pixels is replaced by an `Unreadable`
    (path None: the decoder names the sample) and never decoded."""
    data, labels, indices = stack_bytes(items)
    return [_within_limit(d) for d in data], labels, indices


def _within_limit(data: torch.Tensor):
    try:
        check_size(data)
    except TooLarge as e:
        return Unreadable(None, str(e))
    return data


def _is_jpeg(data) -> bool:
    return isinstance(data, torch.Tensor) and data.numel() > 2 and (int(data[0]), int(data[1])) == JPEG_MAGIC


class DeviceDecodeLoader(WrappedLoader):
    """Wraps a DataLoader of file bytes; yields (images on `device`, labels, indices) like the CPU loader."""

    def __init__(
        self,
        loader,
        device,
        img_size: int,
        train: bool,
        mean,
        std,
        crop_pct: float = 0.875,
        fail_on_bad: bool = False,
        paths=None,
    ):
        super().__init__(loader)
        self.device, self.img_size, self.train = torch.device(device), img_size, train
        self.crop_pct, self.fail_on_bad, self.paths = crop_pct, fail_on_bad, paths
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1) * 255
        # The loader's generator (re-seeded per epoch by set_loader_epoch) also draws the crops.
        self.crop_generator = self.generator or torch.Generator()

    def __iter__(self):
        for data, labels, indices in self.loader:
            images, good = self.decode(data, indices)
            if not good.all():  # stand-ins: a readable item of the batch (image and label), a negative index
                if not good.any():
                    raise UserError(all_unreadable(len(data), self._where(int(indices[0]))))
                source = stand_in_rows(good)
                images = [images[i] for i in source.tolist()]
                labels = labels[source]
                indices = torch.where(good, indices, stand_in_index(indices))
            yield self.augment(images), labels, indices

    def _where(self, index: int) -> str:
        return self.paths[index] if self.paths is not None else f"sample {index}"

    def decode(self, data: list, indices: torch.Tensor) -> tuple[list, torch.Tensor]:
        """Decoded CHW uint8 images on the device (None where a file did not decode), and which decoded."""
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
        return images, torch.tensor([image is not None for image in images])

    def _decode_one(self, data, index: int):
        """One image as (3, H, W) uint8 on the device, or None (reported by skip_or_fail) if it does not decode."""
        if isinstance(data, Unreadable):  # refused in the workers (over the pixel limit)
            skip_or_fail(self._where(index), data.reason, self.fail_on_bad)
            return None
        try:
            if data.numel() == 0:
                raise RuntimeError("empty or unreadable file")
            if _is_jpeg(data):
                return decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
            image = top_byte(decode_image(data, mode=ImageReadMode.RGB))  # 16-bit PNG: the top 8 bits
        except RuntimeError as e:
            try:  # what torchvision.io does not read (BMP, TIFF, PPM, a JPEG it rejects), PIL may: as the cpu path
                image = rgb_tensor(data)
            except BadImage:
                skip_or_fail(self._where(index), f"{type(e).__name__}: {squeezed(e)}", self.fail_on_bad)
                return None
        return image.to(self.device, non_blocking=True)

    def augment(self, images: list) -> torch.Tensor:
        size = [self.img_size, self.img_size]
        if self.train:
            heights = torch.tensor([image.shape[-2] for image in images])
            widths = torch.tensor([image.shape[-1] for image in images])
            boxes = random_resized_boxes(heights, widths, self.crop_generator).tolist()
            flips = torch.rand(len(images), generator=self.crop_generator) < 0.5
            # The CPU resizes uint8 with its own vectorised kernel; CUDA has none, so there the crop
            # becomes float32 first (and stays float: no rounding back to uint8).
            dtype = torch.uint8 if self.device.type == "cpu" else torch.float32
            batch = torch.cat(
                [
                    F.interpolate(
                        image[None, :, top : top + h, left : left + w].to(dtype),
                        size=size,
                        mode="bilinear",
                        antialias=True,
                        align_corners=False,
                    )
                    for image, (top, left, h, w) in zip(images, boxes)
                ]
            )
            if self.device.type == "cuda":  # a pageable copy would make the host wait for the stream
                flips = flips.pin_memory()
            flips = flips.to(self.device, non_blocking=True)
            batch = torch.where(flips.view(-1, 1, 1, 1), batch.flip(-1), batch)
        else:
            resize = int(self.img_size / self.crop_pct)
            batch = torch.stack([TF.center_crop(TF.resize(image, resize, antialias=True), size) for image in images])
        return (batch.float() - self.mean) / self.std


def random_resized_boxes(
    heights: torch.Tensor,
    widths: torch.Tensor,
    generator: torch.Generator,
    scale=(0.08, 1.0),
    ratio=(3 / 4, 4 / 3),
    attempts: int = 10,
) -> torch.Tensor:
    """RandomResizedCrop's boxes for a batch of image sizes, drawn from `generator`: see resized_crop_boxes."""
    uniforms = torch.rand(len(heights), resized_crop_uniforms(attempts), dtype=torch.float64, generator=generator)
    return resized_crop_boxes(heights, widths, uniforms, scale, ratio, attempts)


def resized_crop_uniforms(attempts: int = 10) -> int:
    """How many uniform numbers resized_crop_boxes takes per image."""
    return 2 * attempts + 2


def resized_crop_boxes(
    heights: torch.Tensor,
    widths: torch.Tensor,
    uniforms: torch.Tensor,
    scale=(0.08, 1.0),
    ratio=(3 / 4, 4 / 3),
    attempts: int = 10,
) -> torch.Tensor:
    """RandomResizedCrop's boxes for a batch of image sizes: (n, 4) int64 rows of (top, left, height, width).

    torchvision's rule, for all images at once: up to `attempts` draws of an area (a uniform
    fraction in `scale` of the image's) and a log-uniform aspect ratio; the first draw that fits
    gives the box, at a uniform position. If none fits, the centre crop of the whole image with
    its aspect ratio clamped to `ratio`. `uniforms`: (n, resized_crop_uniforms(attempts)) float64 in [0, 1),
    the randomness of each image (from a generator, or from the sample's seed: data/draws.py)."""
    h_img, w_img = heights.double(), widths.double()
    u_area, u_ratio, position = (
        uniforms[:, :attempts],
        uniforms[:, attempts : 2 * attempts],
        uniforms[:, 2 * attempts :],
    )
    area = (h_img * w_img)[:, None] * (scale[0] + (scale[1] - scale[0]) * u_area)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = (log_lo + (log_hi - log_lo) * u_ratio).exp()
    w = (area * aspect).sqrt().round()
    h = (area / aspect).sqrt().round()
    fits = (w > 0) & (w <= w_img[:, None]) & (h > 0) & (h <= h_img[:, None])
    first = fits.int().argmax(dim=1, keepdim=True)  # index of the first draw that fits (0 if none does)
    h, w = h.gather(1, first).squeeze(1), w.gather(1, first).squeeze(1)
    top = (position[:, 0] * (h_img - h + 1)).floor()
    left = (position[:, 1] * (w_img - w + 1)).floor()

    # No draw fits: centre crop, the aspect ratio clamped to the range.
    image_ratio = w_img / h_img
    fallback_w = torch.where(image_ratio > ratio[1], (h_img * ratio[1]).round(), w_img)
    fallback_h = torch.where(image_ratio < ratio[0], (w_img / ratio[0]).round(), h_img)
    none_fits = ~fits.any(dim=1)
    h = torch.where(none_fits, fallback_h, h)
    w = torch.where(none_fits, fallback_w, w)
    top = torch.where(none_fits, ((h_img - h) / 2).floor(), top)
    left = torch.where(none_fits, ((w_img - w) / 2).floor(), left)
    return torch.stack([top, left, h, w], dim=1).long()
