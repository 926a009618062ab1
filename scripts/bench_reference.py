"""Images per second of a plain training loop: the yardstick for the harness's own overhead.

The same timm model and timm optimizer factory the harness uses (SGD, momentum 0.9, weight
decay 1e-4 off norms and biases), autocast, channels_last, cuDNN autotuning and TF32 as the
harness sets them on CUDA, cross-entropy with label smoothing 0.1, and one fixed batch
already on the device: forward, backward, optimizer step and
nothing else. It imports nothing from the harness. `--warmup` steps, then `--repeats` timed
runs of `--steps` steps (device-synchronised); the median is reported. Prints one JSON object.

    python scripts/bench_reference.py --model resnet50 --batch-size 256 --amp bf16 --channels-last
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import timm
import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2

AMP = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def reference_rate(
    model: str,
    device: str,
    batch_size: int,
    img_size: int,
    amp: str = "none",
    channels_last: bool = False,
    num_classes: int = 1000,
    warmup: int = 5,
    steps: int = 10,
    repeats: int = 3,
) -> dict:
    device = torch.device(device)
    # The harness's CUDA defaults (runtime.cudnn_benchmark, runtime.tf32), so both sides use the same kernels.
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.fp32_precision = torch.backends.cudnn.conv.fp32_precision = "tf32"
    torch.manual_seed(0)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    net = timm.create_model(model, num_classes=num_classes).to(device, memory_format=memory_format)
    optimizer = create_optimizer_v2(net, opt="sgd", lr=0.01, weight_decay=1e-4, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")  # fp16 needs loss scaling
    x = torch.randn(batch_size, 3, img_size, img_size, device=device).contiguous(memory_format=memory_format)
    y = torch.randint(0, num_classes, (batch_size,), device=device)
    net.train()

    def step():
        with torch.autocast(device.type, dtype=AMP[amp], enabled=AMP[amp] is not None):
            loss = F.cross_entropy(net(x), y, label_smoothing=0.1)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        step()
    per_step = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        per_step.append((time.perf_counter() - start) / steps)
    median = statistics.median(per_step)
    return {
        "step_ms": 1000 * median,
        "images_per_second": batch_size / median,
        "repeats_ms": [round(1000 * t, 2) for t in per_step],
    }


def device_name(device: str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu x{torch.get_num_threads()} ({platform.processor() or platform.machine()})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--amp", choices=list(AMP), default="none")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    result = reference_rate(
        args.model,
        args.device,
        args.batch_size,
        args.img_size,
        args.amp,
        args.channels_last,
        args.num_classes,
        args.warmup,
        args.steps,
        args.repeats,
    )
    print(
        json.dumps(
            {
                "model": args.model,
                "batch_size": args.batch_size,
                "img_size": args.img_size,
                "amp": args.amp,
                "channels_last": args.channels_last,
                "device": device_name(args.device),
                "torch": torch.__version__,
                "timm": timm.__version__,
                **result,
            }
        )
    )


if __name__ == "__main__":
    main()
