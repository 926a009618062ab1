"""Checks only a GPU can make: bf16/fp16 autocast, nvJPEG decode, no host sync in a step. Skipped without one."""

import pytest
import torch

from pfb_train.config import load_config
from pfb_train.selection import build_selector
from pfb_train.train import run

pytestmark = pytest.mark.gpu

TINY = [
    "model.name=resnet18",
    "blocking.method=pfb",
    "blocking.pfb.ratio=0.25",
    "blocking.random.ratio=0.25",
    "blocking.infobatch.prune_ratio=0.25",
    "blocking.static_random.drop_fraction=0.25",
    "blocking.pfb.centres=16",
    "data.dataset=synthetic",
    "data.img_size=32",
    "data.batch_size=32",
    "data.train_samples=256",
    "data.val_samples=64",
    "data.workers=0",
    "schedule.epochs=2",
    "schedule.warmup_epochs=0",
    "runtime.device=cuda",
    "runtime.channels_last=true",
    "runtime.progress=false",
]


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_channels_last_run_on_gpu(tmp_path, amp):
    summary = run(load_config(None, [*TINY, f"runtime.amp={amp}", f"runtime.output={tmp_path}"]))
    assert summary["blocked_fraction"] == pytest.approx(0.25)
    assert 0 <= summary["top1"] <= 100


def test_density_is_float32_under_autocast_on_gpu():
    selector = build_selector("pfb", stratify="none", ratio=0.5, centres=16, feature_dim=64)
    feats = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        keep = selector.select(feats)
    assert selector.centres.dtype == torch.float32 and keep.numel() == 32
    assert keep.device.type == "cuda"


def test_device_decode_on_gpu_matches_cpu_decode(tmp_path):
    from helpers import write_smooth_folder
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


@pytest.mark.parametrize(
    "mode,score", [("reuse", {}), ("recompute", {}), ("recompute", {"score_scale": 0.5, "score_norm": "running"})]
)
def test_pfb_step_never_synchronises_the_gpu(mode, score):
    """CUDA's own detector: any host wait inside the step (item, nonzero, copies to the host) raises."""
    import timm

    from pfb_train.engine import Batch, Optimization, StepContext, StepSettings, train_step
    from pfb_train.models import split_model

    model = split_model(timm.create_model("resnet18", num_classes=4), stage=1, mode=mode).cuda()
    model = model.to(memory_format=torch.channels_last)
    selector = build_selector("pfb", stratify="none", ratio=0.4, centres=8, feature_dim=16, **score)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    ctx = StepContext(
        model,
        selector,
        StepSettings(torch.device("cuda"), torch.bfloat16, clip_grad=1.0, check_finite=False),
        Optimization(optimizer, None, torch.amp.GradScaler("cuda", enabled=False)),
    )
    x = torch.randn(20, 3, 32, 32, device="cuda").contiguous(memory_format=torch.channels_last)
    batch = Batch(x, torch.arange(20, device="cuda") % 4, torch.arange(20, device="cuda"))
    train_step(batch, ctx, schedule_at=1)  # first step: lazy initialisation may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(3):
            kept = train_step(batch, ctx, schedule_at=step + 2).kept
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert kept == 12


def test_prefetched_batches_equal_the_cpu_loaders():
    from pfb_train.config import DataConfig
    from pfb_train.data import build_datasets, build_loaders, set_loader_epoch

    cfg = DataConfig(dataset="synthetic", img_size=16, batch_size=8, train_samples=64, val_samples=16, workers=2)
    splits = build_datasets(cfg, num_classes=4)
    gpu_train, _ = build_loaders(splits, cfg, seed=0, pin_memory=True, device="cuda")
    cpu_train, _ = build_loaders(splits, cfg, seed=0, device="cpu")
    set_loader_epoch(gpu_train, 3)
    set_loader_epoch(cpu_train, 3)
    for (xg, yg, ig), (xc, yc, ic) in zip(gpu_train, cpu_train, strict=True):
        assert xg.device.type == "cuda" and yg.device.type == "cuda"
        xg = xg * 1.0  # a kernel on the compute stream must see the finished copy
        assert torch.equal(xg.cpu(), xc) and torch.equal(yg.cpu(), yc) and torch.equal(ig.cpu(), ic)


def test_device_decoded_train_batches_match_the_cpu_run_of_the_same_code(tmp_path):
    """nvJPEG + crops on the prefetch thread's stream: same boxes, flips and order as on the CPU."""
    from helpers import write_smooth_folder
    from pfb_train.config import DataConfig
    from pfb_train.data import build_datasets, build_loaders, set_loader_epoch

    write_smooth_folder(tmp_path, per_class=8, size=lambda i: (40 + 5 * i, 64))
    cfg = DataConfig(dataset="imagefolder", root=str(tmp_path), img_size=32, batch_size=4, workers=2, decode="device")
    splits = build_datasets(cfg)
    gpu_train, _ = build_loaders(splits, cfg, seed=0, pin_memory=True, device="cuda")
    cpu_train, _ = build_loaders(splits, cfg, seed=0, device="cpu")
    assert gpu_train.threaded  # crops draw from the loader's generator: safe on the producer thread
    set_loader_epoch(gpu_train, 2)
    set_loader_epoch(cpu_train, 2)
    for (xg, yg, ig), (xc, yc, ic) in zip(gpu_train, cpu_train, strict=True):
        assert xg.device.type == "cuda" and torch.equal(ig.cpu(), ic) and torch.equal(yg.cpu(), yc)
        assert ((xg * 1.0).cpu() - xc).abs().mean() < 0.05  # nvJPEG and libjpeg round differently


def test_in_memory_dataset_is_served_from_gpu_memory(tmp_path):
    from pfb_train.config import DataConfig
    from pfb_train.data import build_datasets, build_loaders, set_loader_epoch
    from pfb_train.data.resident import ResidentLoader

    cfg = DataConfig(dataset="synthetic", img_size=16, batch_size=8, train_samples=64, val_samples=16, workers=2)
    splits = build_datasets(cfg, num_classes=4)
    gpu_train, gpu_val = build_loaders(splits, cfg, seed=0, pin_memory=True, device="cuda")
    cpu_train, _ = build_loaders(splits, cfg, seed=0, device="cpu")
    assert isinstance(gpu_train, ResidentLoader) and isinstance(gpu_val, ResidentLoader)
    set_loader_epoch(gpu_train, 1)
    set_loader_epoch(cpu_train, 1)
    for (xg, yg, ig), (xc, yc, ic) in zip(gpu_train, cpu_train, strict=True):
        assert xg.is_cuda and torch.equal(xg.cpu(), xc) and torch.equal(yg.cpu(), yc) and torch.equal(ig.cpu(), ic)


def test_dali_mixed_decoder_matches_its_cpu_operators(tmp_path):
    """`data.decode: dali` on a GPU (nvJPEG through DALI's `mixed` decoder): the same samples and, within
    the decoders' rounding, the same pixels as DALI's CPU operators; batches arrive on the GPU in
    channels_last order; a training run with PFB works."""
    pytest.importorskip("nvidia.dali")
    from helpers import write_smooth_folder
    from pfb_train.config import DataConfig
    from pfb_train.data import build_datasets, build_loaders, set_loader_epoch

    write_smooth_folder(tmp_path, per_class=8, size=lambda i: (48 + 5 * i, 64))
    cfg = DataConfig(dataset="imagefolder", root=str(tmp_path), img_size=32, batch_size=4, workers=2, decode="dali")
    splits = build_datasets(cfg)
    gpu_train, gpu_val = build_loaders(splits, cfg, seed=0, pin_memory=True, device="cuda", channels_last=True)
    cpu_train, cpu_val = build_loaders(splits, cfg, seed=0, device="cpu")
    for gpu, cpu in ((gpu_val, cpu_val), (gpu_train, cpu_train)):
        if gpu is gpu_train:
            set_loader_epoch(gpu, 1)
            set_loader_epoch(cpu, 1)
        for (a, ya, ia), (b, yb, ib) in zip(gpu, cpu):
            assert a.device.type == "cuda" and a.is_contiguous(memory_format=torch.channels_last)
            assert torch.equal(ia.cpu(), ib) and torch.equal(ya.cpu(), yb)
            assert (a.cpu() - b).abs().mean() < 0.05  # nvJPEG and libjpeg-turbo round differently
    summary = run(
        load_config(
            None,
            [
                "model.name=resnet18",
                "data.dataset=imagefolder",
                f"data.root={tmp_path}",
                "data.decode=dali",
                "data.img_size=32",
                "data.batch_size=4",
                "data.workers=2",
                "schedule.epochs=2",
                "schedule.warmup_epochs=0",
                "blocking.method=pfb",
                "blocking.pfb.centres=4",
                "blocking.pfb.ratio=0.25",
                "runtime.device=cuda",
                "runtime.amp=bf16",
                "runtime.channels_last=true",
                "runtime.progress=false",
                f"runtime.output={tmp_path}/runs",
            ],
        )
    )
    assert summary["blocked_fraction"] == pytest.approx(0.25)


def test_inductor_compiled_step_matches_eager_and_auto_mode_times_the_parts(tmp_path):
    """runtime.compile with inductor's kernels and a scaled ranking pass in running statistics: the same
    rows kept and the same loss as eager (float32, within tolerance); then a run with blocking.mode
    auto says in summary.json that it timed the parts."""
    import copy

    import timm

    from pfb_train.engine import Batch, Optimization, StepContext, StepSettings, train_step
    from pfb_train.models import split_model

    torch.manual_seed(0)
    base = timm.create_model("resnet18", num_classes=10).cuda()
    x, y = torch.randn(32, 3, 64, 64, device="cuda"), torch.randint(0, 10, (32,), device="cuda")
    indices = torch.arange(32, device="cuda")
    outcome = []
    for compiled in (False, True):
        blocked = split_model(copy.deepcopy(base), 1, "recompute")
        if compiled:
            blocked.compile_parts()
        selector = build_selector("pfb", stratify="none", ratio=0.4, centres=16, score_scale=0.5, score_norm="running")
        optimization = Optimization(
            torch.optim.SGD(blocked.parameters(), lr=0.01), None, torch.amp.GradScaler("cuda", enabled=False)
        )
        context = StepContext(blocked, selector, StepSettings(torch.device("cuda")), optimization)
        steps = [train_step(Batch(x, y, indices), context, 1.0) for _ in range(3)]
        outcome.append(steps)
    for eager, comp in zip(*outcome):
        assert torch.equal(eager.keep, comp.keep)
        assert torch.allclose(eager.loss, comp.loss, rtol=1e-3)
    summary = run(load_config(None, [*TINY, "blocking.mode=auto", f"runtime.output={tmp_path}"]))
    assert summary["blocking_mode"] in ("reuse", "recompute") and "timed on cuda" in summary["blocking_mode_reason"]
