"""Checks only a GPU can make: bf16/fp16 autocast with channels_last on CUDA. Skipped without one."""

import pytest
import torch

from pfb_train.config import load_config
from pfb_train.selection import build_selector
from pfb_train.train import run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TINY = ["model.name=resnet18", "blocking.method=pfb", "blocking.ratio=0.25", "blocking.centers=16",
        "data.dataset=synthetic", "data.img_size=32", "data.batch_size=32", "data.train_samples=256",
        "data.val_samples=64", "data.workers=0", "schedule.epochs=2", "schedule.warmup_epochs=0",
        "runtime.device=cuda", "runtime.channels_last=true", "runtime.progress=false"]


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_channels_last_run_on_gpu(tmp_path, amp):
    summary = run(load_config(None, [*TINY, f"runtime.amp={amp}", f"runtime.output={tmp_path}"]))
    assert summary["blocked_fraction"] == pytest.approx(0.25)
    assert 0 <= summary["top1"] <= 100


def test_density_is_float32_under_autocast_on_gpu():
    selector = build_selector("pfb", ratio=0.5, centers=16, feature_dim=64)
    feats = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        keep = selector.select(feats)
    assert selector.centres.dtype == torch.float32 and keep.numel() == 32
    assert keep.device.type == "cuda"


def test_device_decode_on_gpu_matches_cpu_decode(tmp_path):
    from conftest import write_smooth_folder
    from pfb_train.config import DataConfig
    from pfb_train.data import build_datasets, build_loaders

    write_smooth_folder(tmp_path, per_class=4, size=lambda i: (48, 64))
    cfg = DataConfig(dataset="imagefolder", root=str(tmp_path), img_size=32, batch_size=4, workers=0, decode="device")
    splits = build_datasets(cfg)
    _, gpu_val = build_loaders(splits, cfg, seed=0, device="cuda")
    _, cpu_val = build_loaders(splits, cfg, seed=0, device="cpu")
    a = torch.cat([x for x, _, _ in gpu_val])
    b = torch.cat([x for x, _, _ in cpu_val])
    assert a.device.type == "cuda" and a.shape == b.shape
    assert (a.cpu() - b).abs().mean() < 0.05  # nvJPEG and libjpeg round differently
