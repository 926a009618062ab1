"""Seeds of the run's random streams, each derived from what it belongs to.

Adding numbers (`seed + epoch`, `seed + rank`) makes streams collide: seed 1's epoch 0 would be
seed 0's epoch 1, so a study over seeds 0, 1, 2 would replay one order shifted by an epoch.
Every stream instead takes its seed from NumPy's SeedSequence over (stream name, run seed, ...),
a hash built so that distinct inputs give unrelated, non-colliding states (O'Neill, "PCG", 2014;
numpy.random.SeedSequence).
"""

from __future__ import annotations

import zlib

import numpy as np

_WORD = 2**64


def derive_seed(stream: str, *parts: int) -> int:
    """A 63-bit seed (a Python int in [0, 2**63)) for the stream `stream` (e.g. "shuffle") keyed by
    integer `parts` (e.g. run seed, epoch); any int, negative ones included. The same inputs give
    the same seed on every rank, run and machine."""
    entropy = [zlib.crc32(stream.encode()), *(int(p) % _WORD for p in parts)]
    low, high = np.random.SeedSequence(entropy).generate_state(2, np.uint32).tolist()
    return (high << 32 | low) >> 1
