"""PFB in a plain PyTorch + timm training loop: the lines marked `# PFB` are all it adds.

    python examples/own_loop.py --epochs 3 --ratio 0.4                # CPU, synthetic data
    torchrun --nproc_per_node=2 examples/own_loop.py --device cuda    # DDP: one wrapper, as usual

Each step, the model's stem and first stage run on the whole batch; the density model blocks the
most common `ratio` of the rows, and only the rest go through the deep layers and the backward.
"""

import argparse
import os

import timm
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import pfb_train


def main(argv=None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--ratio", type=float, default=0.4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    ddp = "RANK" in os.environ
    if ddp:
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    device = (
        torch.device(args.device, int(os.environ.get("LOCAL_RANK", 0)))
        if args.device == "cuda"
        else torch.device("cpu")
    )
    torch.manual_seed(0)
    images, labels = torch.randn(256, 3, 32, 32), torch.randint(0, 10, (256,))
    data = TensorDataset(images + labels.view(-1, 1, 1, 1) * 0.5, labels)  # learnable: class shifts the mean
    sampler = DistributedSampler(data, drop_last=True) if ddp else None
    loader = DataLoader(data, batch_size=args.batch_size, sampler=sampler, shuffle=sampler is None, drop_last=True)

    model = timm.create_model("resnet18", num_classes=10)
    blocking = pfb_train.Blocking(
        model,
        "pfb",
        ratio=args.ratio,
        centres=16,
        feature_dim=32,  # PFB
        epochs=args.epochs,
    )
    net = blocking.model.to(device)  # the split model: use it where `model` was used
    train_module = torch.nn.parallel.DistributedDataParallel(net) if ddp else net
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    kept = seen = 0
    for epoch in range(args.epochs):
        blocking.set_epoch(epoch)  # PFB
        if sampler is not None:
            sampler.set_epoch(epoch)
        net.train()
        loss_sum = torch.zeros((), device=device)  # summed on the device: no host sync per step
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            with torch.autocast(**amp):
                batch = blocking.forward(train_module, x, y)  # PFB: logits and targets of the kept rows
            losses = F.cross_entropy(batch.logits.float(), batch.targets, reduction="none")
            optimizer.zero_grad(set_to_none=True)
            blocking.loss(batch, losses).backward()  # PFB: the method's mean of the kept rows' losses
            optimizer.step()
            blocking.observe(batch, losses)  # PFB: the density model follows the data
            kept, seen = kept + batch.logits.shape[0], seen + x.shape[0]
            loss_sum += losses.detach().sum()
        mean_loss = loss_sum.item() / (len(loader) * batch.logits.shape[0])  # over the epoch's kept rows
        print(f"epoch {epoch}: loss {mean_loss:.3f}  kept {kept / seen:.3f}")
    if ddp:
        dist.destroy_process_group()
    return {"kept_fraction": kept / seen, "loss": mean_loss, "net": net, "blocking": blocking}


if __name__ == "__main__":
    main()
