"""Aspect-ratio buckets: the (width, height) sizes examples are resized to, and batches within one bucket.

Each example is resized (cover + centre crop, eddpm/images.py) to the bucket closest to its aspect ratio,
so a batch of one bucket stacks without padding; BucketBatchSampler makes such batches for a DataLoader.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch


def make_buckets(
    resolution: int, min_side: int | None = None, max_side: int | None = None, step: int = 64
) -> list[tuple[int, int]]:
    """(width, height) pairs with sides multiples of `step` and an area within 10 % of resolution**2.

    Sides lie in [min_side, max_side]; for each width the height is the multiple of `step` closest to
    resolution**2 / width. Defaults: min_side = resolution / 2 and max_side = 2 * resolution (rounded to
    `step`), so resolution 512 spans IC-Light's 256..1024 range. IC-Light's default 512x640 is a bucket from resolution 576 (area within
    1.2 %); at 512 it is 25 % too large. Sorted by aspect ratio, square included.
    """
    min_side = min_side or max(step, resolution // 2 // step * step)
    max_side = max_side or max(min_side, -(-2 * resolution // step) * step)
    target_area = resolution * resolution
    buckets = set()
    for width in range(-(-min_side // step) * step, max_side + 1, step):
        height = max(step, round(target_area / width / step) * step)
        if min_side <= height <= max_side and abs(width * height / target_area - 1) <= 0.1:
            buckets.add((width, height))
    if not buckets:
        raise ValueError(f"no bucket with sides in [{min_side}, {max_side}] fits resolution {resolution}")
    return sorted(buckets, key=lambda b: (b[0] / b[1], b[0]))


def assign_bucket(width: int, height: int, buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to width/height (in log ratio; ties: the first listed)."""
    log_aspect = math.log(width / height)
    return min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - log_aspect))


class BucketBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of `batch_size` indices that all share one bucket, for DataLoader(batch_sampler=...).

    Each pass shuffles the items inside each bucket, cuts them into batches and shuffles the order of all
    batches, from numpy's default_rng([seed, epoch]): the same (seed, epoch) gives the same batches on
    every process, as accelerate's sharding of batch samplers needs. Every batch is full: a bucket's
    remainder is dropped (drop_last=True) or topped up with items of the same bucket drawn again (the
    default), because accelerate assumes only the last batch can be short and would otherwise fill it
    across buckets. Every pass advances the epoch by one; `set_epoch(e)` pins it (accelerate calls it
    at each pass; call it yourself when resuming).
    """

    def __init__(
        self, dataset, batch_size: int, shuffle: bool = True, seed: int = 0, drop_last: bool = False
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size, self.shuffle, self.seed, self.drop_last = batch_size, shuffle, seed, drop_last
        self.epoch = 0
        groups: dict = {}
        for index, bucket in enumerate(getattr(dataset, "buckets", dataset)):
            groups.setdefault(bucket, []).append(index)
        self._groups = list(groups.values())

    @property
    def sampler(self):
        # accelerate looks for set_epoch on `batch_sampler.sampler` once it wraps this in a BatchSamplerShard.
        return self

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        self.epoch += 1
        batches = []
        for indices in self._groups:
            order = [indices[i] for i in rng.permutation(len(indices))] if self.shuffle else list(indices)
            short = -len(order) % self.batch_size
            if short and not self.drop_last:
                order += [order[i % len(order)] for i in range(short)]  # top up from the same bucket
            for first in range(0, len(order) - self.batch_size + 1, self.batch_size):
                batches.append(order[first : first + self.batch_size])
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return iter(batches)

    def __len__(self) -> int:
        if self.drop_last:
            return sum(len(g) // self.batch_size for g in self._groups)
        return sum(-(-len(g) // self.batch_size) for g in self._groups)
