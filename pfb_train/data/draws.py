"""Random draws of one sample's augmentation, from its key alone.

The train sampler gives every sample of an epoch a seed that depends on (run seed, epoch,
dataset index) only (`TrainSampler.sample_seeds`). Batched augmentation (DALI crop
boxes and flips, in-memory sets augmented on the device) turns those seeds into uniform
numbers with a counter-based hash, SplitMix64 (Steele, Lea & Flood, "Fast splittable
pseudorandom number generators", OOPSLA 2014): draw j of a sample is mix(seed + (j + 1) * γ).
No generator holds state, so the numbers of a sample are the same whichever batch, worker or
rank makes it and whether or not the run was resumed inside the epoch; a batch of n samples
costs a few NumPy array ops, not n generator objects.
"""

from __future__ import annotations

import numpy as np
import torch

_GOLDEN_GAMMA = np.uint64(0x9E3779B97F4A7C15)


def _mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64's output function on uint64 arrays (wrapping arithmetic)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def sample_uniforms(seeds: torch.Tensor, count: int) -> torch.Tensor:
    """(n, count) float64 numbers in [0, 1), row i drawn from `seeds[i]` (any int64 tensor of shape (n,)).

    53 random bits each, as NumPy's and PyTorch's doubles. Equal seeds give equal rows; the
    columns of a row are independent draws."""
    base = seeds.detach().cpu().numpy().astype(np.int64).view(np.uint64)
    steps = np.arange(1, count + 1, dtype=np.uint64) * _GOLDEN_GAMMA
    with np.errstate(over="ignore"):
        bits = _mix(base[:, None] + steps[None, :])
    return torch.from_numpy((bits >> np.uint64(11)).astype(np.float64) * 2.0**-53)
