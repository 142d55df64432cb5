"""Aspect-ratio buckets and the bucket batch sampler (deterministic per seed and epoch, shardable)."""

import math
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eddpm.buckets import BucketBatchSampler, assign_bucket, make_buckets


@pytest.mark.parametrize("resolution", [128, 256, 512, 576, 768, 1024])
def test_buckets_are_multiples_of_64_with_about_the_target_area(resolution):
    buckets = make_buckets(resolution)
    assert buckets
    for width, height in buckets:
        assert width % 64 == 0 and height % 64 == 0, (width, height)
        assert abs(width * height / resolution**2 - 1) <= 0.1, (width, height)
    assert buckets == sorted(buckets, key=lambda b: b[0] / b[1])
    if resolution % 64 == 0:
        assert (resolution, resolution) in buckets


def test_iclight_default_512x640_is_a_bucket_at_576():
    assert (512, 640) in make_buckets(576)
    assert (512, 640) not in make_buckets(512)  # 25 % more area than 512**2
    assert assign_bucket(1024, 1280, make_buckets(576)) == (512, 640)
    assert (
        min(min(b) for b in make_buckets(512)) >= 256
        and max(max(b) for b in make_buckets(512)) <= 1024
    )


@settings(max_examples=200, deadline=None)
@given(st.integers(16, 4000), st.integers(16, 4000), st.sampled_from([128, 512, 576, 768]))
def test_assign_bucket_picks_the_closest_aspect_ratio(width, height, resolution):
    buckets = make_buckets(resolution)
    chosen = assign_bucket(width, height, buckets)
    best = None
    for bucket in buckets:  # reference: a plain loop over the buckets
        distance = abs(math.log(bucket[0] / bucket[1]) - math.log(width / height))
        if best is None or distance < best[0] - 1e-12:
            best = (distance, bucket)
    assert chosen == best[1]


BUCKETS = [(64, 64)] * 7 + [(128, 64)] * 5 + [(64, 128)] * 3


def _batches(sampler) -> list[list[int]]:
    return [list(batch) for batch in sampler]


@pytest.mark.parametrize("drop_last", [False, True])
def test_bucket_batches_are_full_hold_one_bucket_and_cover_every_index(drop_last):
    sampler = BucketBatchSampler(BUCKETS, batch_size=2, seed=0, drop_last=drop_last)
    batches = _batches(sampler)
    assert len(batches) == len(sampler) == (6 if drop_last else 9)
    for batch in batches:
        assert len(batch) == 2 and len({BUCKETS[i] for i in batch}) == 1, batch
    seen = [i for batch in batches for i in batch]
    if drop_last:  # one item of each odd-sized bucket left out, none repeated
        assert len(seen) == len(set(seen)) == 12
    else:  # each odd-sized bucket tops up its last batch with one of its own items
        assert sorted(set(seen)) == list(range(len(BUCKETS))) and len(seen) == 18
        assert sorted(BUCKETS[i] for i, n in Counter(seen).items() if n == 2) == sorted({*BUCKETS})


def test_bucket_sampler_is_deterministic_per_seed_and_epoch():
    def at(seed, epoch):
        sampler = BucketBatchSampler(BUCKETS, batch_size=2, seed=seed)
        sampler.set_epoch(epoch)
        return _batches(sampler)

    assert at(0, 0) == at(0, 0)
    assert at(0, 0) != at(0, 1)
    assert at(0, 0) != at(1, 0)
    sampler = BucketBatchSampler(BUCKETS, batch_size=2, seed=0)
    assert [_batches(sampler), _batches(sampler)] == [at(0, 0), at(0, 1)]  # each pass advances the epoch
    ordered = BucketBatchSampler(BUCKETS, batch_size=3, shuffle=False)
    assert _batches(ordered)[:3] == [[0, 1, 2], [3, 4, 5], [6, 0, 1]]


def test_bucket_sampler_shards_under_accelerate():
    shard = pytest.importorskip("accelerate.data_loader").BatchSamplerShard
    sampler = BucketBatchSampler(BUCKETS, batch_size=2, seed=3)
    full = _batches(sampler)
    shards = []
    for rank in range(2):
        sampler.set_epoch(0)  # every process sees the same batches, then takes its share
        shards.append(_batches(shard(sampler, num_processes=2, process_index=rank)))
    assert shards[0] == full[0::2]
    assert shards[1] == full[1::2] + full[:1]  # 9 batches: accelerate repeats the first for rank 1
    for batch in shards[0] + shards[1]:
        assert len({BUCKETS[i] for i in batch}) == 1, batch
    assert sampler.sampler is sampler  # where accelerate looks for set_epoch after sharding
