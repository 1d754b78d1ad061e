"""The training data order: one bucket per batch, split across processes, nothing dropped or repeated."""
from __future__ import annotations

import threading
from collections import Counter

import pytest

from fluxlora.cache import ImageEntry
from fluxlora.sampler import BucketBatchStream, prefetch, resume_position


def entries(sizes: dict[tuple[int, int], int]) -> list[ImageEntry]:
    out = []
    for (w, h), count in sizes.items():
        for i in range(count):
            out.append(ImageEntry(sample_id=f"{w}x{h}-{i}", caption_id=f"c{w}x{h}-{i}", resolution=512, width=w,
                                  height=h, flipped=False, shard="s", source=f"{w}x{h}/{i}"))
    return out


SIZES = {(512, 512): 7, (640, 384): 5, (384, 640): 2, (768, 320): 1}


@pytest.mark.parametrize("global_batch", [1, 2, 4])
def test_batches_hold_one_bucket_and_cover_each_epoch(global_batch):
    items = entries(SIZES)
    stream = BucketBatchStream(items, global_batch, seed=3, repeats=2)
    seen: Counter = Counter()
    position = 0
    epochs = 6
    while stream.epoch_of(position) < epochs:
        batch = stream.batch(position)
        assert len(batch.entries) == global_batch
        assert len({(e.width, e.height) for e in batch.entries}) == 1
        seen.update(e.sample_id for e in batch.entries)
        position += 1
    seen.update(items[i].sample_id for batch in stream._epochs[epochs] for i in batch)  # built to find the end
    epochs += 1
    # what was not trained yet is exactly the carry: incomplete batches wait, never dropped or padded
    carried = Counter(items[i].sample_id for pool in stream._carry.values() for i in pool)
    assert all(len(pool) < global_batch for pool in stream._carry.values())
    assert seen + carried == Counter({e.sample_id: epochs * 2 for e in items})


def test_processes_split_each_global_batch_without_overlap():
    stream = BucketBatchStream(entries(SIZES), 4, seed=0)
    for position in range(10):
        whole = stream.batch(position)
        parts = [stream.batch(position, rank, 2) for rank in range(2)]
        assert parts[0].entries + parts[1].entries == whole.entries
        assert parts[0].sample_indices + parts[1].sample_indices == whole.sample_indices
        assert set(parts[0].sample_indices).isdisjoint(parts[1].sample_indices)


def test_order_depends_on_seed_only():
    def order(seed):
        stream = BucketBatchStream(entries(SIZES), 2, seed=seed, caption_dropout=0.5)
        return [(stream.batch(p).entries, stream.batch(p).drop_caption) for p in range(12)]

    a, b, c = order(1), order(1), order(2)
    assert a == b
    assert [e for e, _ in a] != [e for e, _ in c] and [d for _, d in a] != [d for _, d in c]


def test_each_epoch_is_reshuffled_and_mixes_buckets():
    stream = BucketBatchStream(entries(SIZES), 1, seed=4)  # batch 1: no carry, each epoch holds all 15
    epochs = [[stream.batch(p).entries[0] for p in range(start, start + 15)] for start in (0, 15)]
    assert sorted(epochs[0], key=str) == sorted(epochs[1], key=str) and epochs[0] != epochs[1]
    buckets = [(e.width, e.height) for e in epochs[0]]
    switches = sum(a != b for a, b in zip(buckets, buckets[1:]))
    assert switches > len(SIZES) - 1  # not one bucket after another


def test_iterate_resumes_mid_stream():
    stream = BucketBatchStream(entries(SIZES), 2, seed=5)
    it = stream.iterate(0, 0, 1)
    first = [next(it) for _ in range(9)]
    again = BucketBatchStream(entries(SIZES), 2, seed=5).iterate(4, 0, 1)
    assert [next(again) for _ in range(5)] == first[4:]


def test_caption_dropout_is_per_sample_and_near_its_rate():
    stream = BucketBatchStream(entries(SIZES), 1, seed=0, caption_dropout=0.25)
    drops = [stream.batch(p).drop_caption[0] for p in range(2000)]
    assert 0.2 < sum(drops) / len(drops) < 0.3
    split = BucketBatchStream(entries(SIZES), 2, seed=0, caption_dropout=0.25)
    # sample index, not process layout, decides
    part = split.batch(3, 1, 2)
    assert part.sample_indices == (7,) and part.drop_caption == stream.batch(7).drop_caption
    assert [split.batch(p, r, 2).drop_caption[0] for p in range(50) for r in (0, 1)] == drops[:100]


def test_resume_position_maps_to_a_new_global_batch():
    assert resume_position({"position": 10, "global_batch": 4}, 4) == 10
    assert resume_position({"position": 10, "global_batch": 4}, 8) == 5  # 40 samples seen either way
    assert resume_position({"position": 3, "global_batch": 2}, 4) == 2  # rounds up: none trained twice


def test_prefetch_loads_ahead_and_stops_its_thread_on_close():
    loaded = []

    def load(i):
        loaded.append(i)
        return {"i": i}

    gen = prefetch(iter(range(100)), load, depth=2)
    assert next(gen) == (0, {"i": 0})
    gen.close()
    assert not [t for t in threading.enumerate() if t.name == "fluxlora-prefetch"]
    assert len(loaded) < 10


def test_prefetch_raises_loader_errors_in_the_caller():
    def load(i):
        if i == 2:
            raise OSError("disk gone")
        return {}

    gen = prefetch(iter(range(5)), load)
    assert [next(gen)[0] for _ in range(2)] == [0, 1]
    with pytest.raises(OSError, match="disk gone"):
        next(gen)
