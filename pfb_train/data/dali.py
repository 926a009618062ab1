"""Stored images decoded and augmented by NVIDIA DALI (`data.decode: dali`).

The harness keeps every decision about which sample goes where: its samplers (order, rank
shares, subsets of sampler-level methods, resume offsets) pick the samples, DataLoader
workers read their stored bytes (imagefolder files, hf cells, wds tar members) and each
image's size from its header. The training process then draws each sample's crop box and
flip from the sample's own seed (data/draws.py: a function of run seed, epoch and index), and
DALI does the rest in its own C++ threads, outside Python's GIL: decodes only the crop's
region (`decoders.image_slice`; nvJPEG and the hardware decoder with `mixed` on a GPU,
libjpeg-turbo and friends with `cpu` operators without one), resizes with antialiasing,
flips and normalises, and writes the batch on the training device, float32, in
channels_last order when `runtime.channels_last` (DALI's HWC output viewed as NCHW).

This is MLPerf's ResNet-50 input, minus DALI's own readers and random operators: they would
take the order and the randomness away from the harness. Because a sample's pixels depend
on its seed alone, any worker count, rank split or resume inside an epoch gives the same
pixels (tested against the cpu path for validation, and across resumes for training).

Train: RandomResizedCrop (scale 0.08-1, ratio 3/4-4/3; the rule of device_decode.py's
`resized_crop_boxes`) + horizontal flip. Validation: resize the shorter side to
floor(img_size / crop_pct) (timm's eval transform), centre crop.

Bad images stand in as on the other paths (missing.py): a header that does not parse, or that
claims more than decode.MAX_PIXELS pixels (a decompression bomb), is found in the workers; an
image whose data does not decode fails DALI's whole batch, which is then decoded one image at a
time to find it (rare: costs one extra pass of that batch). 16-bit PNGs: DALI scales them by
255/65535, within one level of the top 8 bits the other paths keep.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import sys
import tempfile
import threading
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch

from pfb_train.data.decode import BadImage, header_size
from pfb_train.data.device_decode import resized_crop_boxes, resized_crop_uniforms, stack_bytes
from pfb_train.data.draws import sample_uniforms
from pfb_train.data.missing import Unreadable, all_unreadable, skip_or_fail, stand_in_index, stand_in_rows
from pfb_train.data.wrapped import WrappedLoader
from pfb_train.errors import UserError

if TYPE_CHECKING:
    from nvidia.dali.pipeline import Pipeline

INSTALL = "pip install nvidia-dali-cuda130 (or: pip install 'pfb-train[dali]')"


def import_dali():
    """DALI's modules (fn, types, pipeline_def, feed_ndarray); a one-line UserError naming the install without it."""
    try:
        from nvidia.dali import fn, pipeline_def, types  # optional (the `dali` extra): only data.decode dali
        from nvidia.dali.plugin.pytorch import feed_ndarray
    except ImportError:
        raise UserError(f"data.decode 'dali' needs NVIDIA DALI: {INSTALL}") from None
    return fn, types, pipeline_def, feed_ndarray


def collate_sized_bytes(items):
    """(file bytes, label, index) items -> (byte tensors, labels, indices, (n, 2) int64 heights and widths).

    Runs in the DataLoader workers: the sizes come from each image's header (PIL reads no pixels
    for it, decode.py's `header_size`), so the training process can draw crop boxes without
    decoding. An image whose header does not parse, or claims more than decode.MAX_PIXELS pixels,
    gets size (0, 0) and an `Unreadable` saying why in place of its bytes: the decoder counts it
    as unreadable and never decodes it."""
    data, labels, indices = stack_bytes(items)
    sizes = []
    for i, encoded in enumerate(data):
        try:
            sizes.append(header_size(encoded) if encoded.numel() else (0, 0))
        except BadImage as e:
            data[i] = Unreadable(None, str(e))
            sizes.append((0, 0))
    return data, labels, indices, torch.tensor(sizes, dtype=torch.long).view(-1, 2)


def resize_shorter(heights: torch.Tensor, widths: torch.Tensor, size: int) -> torch.Tensor:
    """(n, 2) int64 (height, width) after resizing the shorter side to `size`: torchvision's Resize(int)."""
    short, long = torch.minimum(heights, widths), torch.maximum(heights, widths)
    new_long = (size * long.double() / short.double()).long()  # truncated, as torchvision does
    tall = heights > widths
    return torch.stack([torch.where(tall, new_long, size), torch.where(tall, size, new_long)], dim=1)


def centre_boxes(sizes: torch.Tensor, crop: int) -> torch.Tensor:
    """(n, 4) int64 (top, left, height, width) of torchvision's CenterCrop(crop) on images of (n, 2) sizes."""
    top = ((sizes[:, 0] - crop).double() / 2).round()
    left = ((sizes[:, 1] - crop).double() / 2).round()
    side = torch.full_like(top, crop)
    return torch.stack([top, left, side, side], dim=1).long()


class DaliLoader(WrappedLoader):
    """Wraps a DataLoader of (bytes, labels, indices, sizes) (`collate_sized_bytes`); yields (images on
    `device` (n, 3, img_size, img_size) float32 normalised, labels, indices) like the other paths.

    `threads`: DALI's CPU threads. Raises UserError without DALI installed (naming the install),
    when every image of a batch is unreadable, or for an unreadable image with `fail_on_bad`."""

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
        threads: int = 1,
        channels_last: bool = False,
    ):
        super().__init__(loader)
        self.fn, self.types, self.pipeline_def, self.feed_ndarray = import_dali()
        self.device, self.img_size, self.train = torch.device(device), img_size, train
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.crop_pct, self.fail_on_bad, self.paths = crop_pct, fail_on_bad, paths
        self.mean = [255 * m for m in mean]
        self.std = [255 * s for s in std]
        self.threads, self.channels_last = threads, channels_last
        self.pipeline: Optional[Pipeline] = None  # built at the first batch: after the workers have forked

    def __iter__(self):
        for data, labels, indices, sizes in self.loader:
            seeds = self.loader.sampler.sample_seeds(indices) if self.train else None
            good = (sizes > 0).all(dim=1)
            for i in (~good).nonzero().flatten().tolist():
                reason = data[i].reason if isinstance(data[i], Unreadable) else "empty or unreadable file"
                skip_or_fail(self._where(int(indices[i])), reason, self.fail_on_bad)
            while True:
                if not good.any():
                    raise UserError(all_unreadable(len(data), self._where(int(indices[0]))))
                rows = stand_in_rows(good)
                try:
                    images = self.run(data, sizes, seeds, rows)
                    break
                except RuntimeError:  # a file whose header parsed but whose data does not decode
                    decodable = self._decodable(data, sizes, seeds, good, indices)
                    if decodable[good].all():
                        raise  # every image decodes alone: the error is DALI's, not a file's
                    good &= decodable
            yield images, labels[rows], torch.where(good, indices, stand_in_index(indices))

    def _where(self, index: int) -> str:
        return self.paths[index] if self.paths is not None else f"sample {index}"

    def _decodable(self, data, sizes, seeds, good, indices) -> torch.Tensor:
        """Which `good` rows decode alone (bool, (n,)); those that do not are reported (skip_or_fail)."""
        ok = torch.ones(len(data), dtype=torch.bool)
        for i in good.nonzero().flatten().tolist():
            try:
                self.run(data, sizes, seeds, torch.tensor([i]))
            except RuntimeError:
                ok[i] = False
                skip_or_fail(self._where(int(indices[i])), "DALI cannot decode it", self.fail_on_bad)
        return ok

    def run(self, data: list, sizes: torch.Tensor, seeds: Optional[torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
        """The batch of `rows` (row i of the batch made from sample rows[i]), decoded and augmented by DALI."""
        pipeline = self.pipeline
        if pipeline is None:
            pipeline = self.pipeline = self._build()
        sizes = sizes[rows]
        if self.train:
            assert seeds is not None  # drawn for every training batch (__iter__)
            uniforms = sample_uniforms(seeds[rows], resized_crop_uniforms() + 1)
            boxes = resized_crop_boxes(sizes[:, 0], sizes[:, 1], uniforms[:, :-1])
            flips = uniforms[:, -1] < 0.5
            pipeline.feed_input("mirror", [np.array(f, dtype=np.int32) for f in flips.tolist()])
        else:
            resized = resize_shorter(sizes[:, 0], sizes[:, 1], math.floor(self.img_size / self.crop_pct))
            boxes = centre_boxes(resized, self.img_size)
            pipeline.feed_input("resize", [s.astype(np.float32) for s in resized.numpy()])
        int_boxes = boxes.int().numpy()
        pipeline.feed_input("encoded", [data[i].numpy() for i in rows.tolist()])
        pipeline.feed_input("start", [np.ascontiguousarray(b[:2]) for b in int_boxes])
        pipeline.feed_input("shape", [np.ascontiguousarray(b[2:]) for b in int_boxes])
        try:
            with decoder_logs_muted():
                (out,) = pipeline.run()
        except RuntimeError:
            self.pipeline = None  # DALI's pipeline is unusable after an error: build a new one
            raise
        return self._to_torch(out.as_tensor())

    def _to_torch(self, dense) -> torch.Tensor:
        images = torch.empty(dense.shape(), dtype=torch.float32, device=self.device)
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        self.feed_ndarray(dense, images, cuda_stream=stream)  # a copy: DALI reuses its output buffers
        return images.permute(0, 3, 1, 2) if self.channels_last else images  # NHWC memory = channels_last

    def _build(self):
        fn, types = self.fn, self.types
        on_gpu = self.device.type == "cuda"
        decoder_device = "mixed" if on_gpu else "cpu"
        size, train = self.img_size, self.train
        layout = "HWC" if self.channels_last else "CHW"

        @self.pipeline_def(
            batch_size=self.loader.batch_size,
            num_threads=self.threads,
            device_id=self.device.index if on_gpu else None,
            exec_async=False,
            exec_pipelined=False,
        )
        def pipeline():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            start = fn.external_source(name="start", dtype=types.INT32, ndim=1)
            shape = fn.external_source(name="shape", dtype=types.INT32, ndim=1)
            # Orientation is not applied from EXIF, as on the cpu and device paths (and the header sizes)
            common = dict(device=decoder_device, output_type=types.RGB, adjust_orientation=False)
            linear = dict(interp_type=types.INTERP_LINEAR, antialias=True)
            if train:  # decode only the crop's region, then resize it to the model's input
                mirror = fn.external_source(name="mirror", dtype=types.INT32, ndim=0)
                images = fn.decoders.image_slice(
                    encoded, start, shape, axis_names="HW", normalized_anchor=False, normalized_shape=False, **common
                )
                images = fn.resize(images, size=[size, size], **linear)
            else:
                mirror = 0
                resize = fn.external_source(name="resize", dtype=types.FLOAT, ndim=1)
                images = fn.resize(fn.decoders.image(encoded, **common), size=resize, **linear)
                images = fn.slice(
                    images, start, shape, axis_names="HW", normalized_anchor=False, normalized_shape=False
                )
            return fn.crop_mirror_normalize(
                images, mirror=mirror, mean=self.mean, std=self.std, dtype=types.FLOAT, output_layout=layout
            )

        built = pipeline()
        built.build()
        return built


_MUTE_LOCK = threading.Lock()  # also guards _capture
_capture = None  # the temporary file stderr goes to while muted: made once, emptied each time
# What other threads of this process may write to stderr meanwhile: progress bars (carriage returns),
# Python warnings and the harness's own lines. Everything else written then is the decoders'.
_KEEP = re.compile(rb"\r|Warning|^(pfb-train|note|warning):")


@contextlib.contextmanager
def decoder_logs_muted():
    """Leave out of stderr what DALI's image decoders print while the block runs.

    nvImageCodec and libjpeg-turbo print a red `[ERROR]` line (and libjpeg its own) for every image
    they cannot decode, and for some they then decode by a fallback; the harness already counts
    undecodable images in `bad_samples` and stands in for them, so those lines only alarm. The
    process's stderr (file descriptor 2, which native code writes to) goes to a temporary file for
    the block; lines of other kinds written meanwhile (_KEEP) are passed on afterwards."""
    global _capture
    with _MUTE_LOCK:
        if _capture is None:
            _capture = tempfile.TemporaryFile()
        capture = _capture
        capture.seek(0)
        capture.truncate()
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            lines = re.findall(rb"[^\n]+\n?|\n", capture.read())  # split at newlines only: a bar's \r stays
            kept = [line for line in lines if _KEEP.search(line)]
            if kept:
                os.write(2, b"".join(kept))
