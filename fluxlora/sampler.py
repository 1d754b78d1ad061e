"""Training data order: single-bucket batches from the cache, split across processes, resumable.

The order is a pure function of the seed and the global batch size (batch size x processes): an
endless stream of epochs, each a shuffled list of global batches, every one drawn from one bucket
(one latent shape). Within an epoch every image appears `repeats` times, except that a bucket's
last, incomplete global batch is carried into the next epoch rather than dropped or padded with
repeats. Process r takes slice r of each global batch, so all processes step on equal batches.

Every sample has a global index (its place in the stream); its noise, sigma and caption dropout
derive from the seed and that index alone. So one process with batch 2 trains on exactly what two
processes with batch 1 do, and a checkpoint need only keep the stream position.
"""
from __future__ import annotations

import math
import queue
import random
import threading
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence, TypeVar

import torch

from .cache import EmbeddingCache, ImageEntry

T = TypeVar("T")


@dataclass(frozen=True)
class Batch:
    """One process's share of a global batch: entries of one bucket with their sample indices."""

    position: int  # index of the global batch in the stream
    entries: tuple[ImageEntry, ...]
    sample_indices: tuple[int, ...]  # global index of each sample: seeds its noise and sigma
    drop_caption: tuple[bool, ...]  # train this sample on the empty caption


class BucketBatchStream:
    def __init__(self, entries: Sequence[ImageEntry], global_batch: int, seed: int, *, repeats: int = 1,
                 caption_dropout: float = 0.0):
        if not entries:
            raise ValueError("the cache holds no images for the chosen --resolutions")
        self.entries = list(entries)
        self.global_batch = global_batch
        self.seed = seed
        self.repeats = repeats
        self.caption_dropout = caption_dropout
        self._by_bucket: dict[tuple[int, int], list[int]] = defaultdict(list)
        for index, entry in enumerate(self.entries):
            self._by_bucket[(entry.width, entry.height)].extend([index] * repeats)
        self._epochs: list[list[list[int]]] = []  # per epoch, the global batches (entry indices)
        self._starts: list[int] = []  # stream position of each epoch's first batch
        self._carry: dict[tuple[int, int], list[int]] = {bucket: [] for bucket in self._by_bucket}

    def _build_next_epoch(self) -> None:
        epoch = len(self._epochs)
        rng = random.Random(f"{self.seed}:{epoch}")
        batches: list[list[int]] = []
        for bucket in sorted(self._by_bucket):
            pool = list(self._by_bucket[bucket])
            rng.shuffle(pool)
            pool = self._carry[bucket] + pool
            full = len(pool) - len(pool) % self.global_batch
            batches += [pool[i:i + self.global_batch] for i in range(0, full, self.global_batch)]
            self._carry[bucket] = pool[full:]
        rng.shuffle(batches)
        self._starts.append(self._starts[-1] + len(self._epochs[-1]) if self._epochs else 0)
        self._epochs.append(batches)

    def _locate(self, position: int) -> tuple[int, list[int]]:
        while not self._epochs or position >= self._starts[-1] + len(self._epochs[-1]):
            self._build_next_epoch()
        epoch = next(e for e in range(len(self._epochs) - 1, -1, -1) if self._starts[e] <= position)
        return epoch, self._epochs[epoch][position - self._starts[epoch]]

    def epoch_of(self, position: int) -> int:
        return self._locate(position)[0]

    def batch(self, position: int, rank: int = 0, world_size: int = 1) -> Batch:
        """Slice `rank` of global batch `position`."""
        _, indices = self._locate(position)
        per_rank = self.global_batch // world_size
        first = position * self.global_batch + rank * per_rank
        sample_indices = tuple(range(first, first + per_rank))
        return Batch(position=position,
                     entries=tuple(self.entries[i] for i in indices[rank * per_rank:(rank + 1) * per_rank]),
                     sample_indices=sample_indices,
                     drop_caption=tuple(random.Random(f"{self.seed}:drop:{i}").random() < self.caption_dropout
                                        for i in sample_indices))

    def iterate(self, start: int, rank: int, world_size: int) -> Iterator[Batch]:
        """This process's share of every global batch from position `start` on."""
        position = start
        while True:
            yield self.batch(position, rank, world_size)
            position += 1


def resume_position(state: dict, global_batch: int) -> int:
    """Stream position to resume at, from a checkpoint's trainer state.

    With the same global batch size this is exact. With another (a different number of processes
    or batch size) the stream itself differs; the run continues after the same number of samples.
    """
    if state["global_batch"] == global_batch:
        return state["position"]
    return math.ceil(state["position"] * state["global_batch"] / global_batch)


def load_batch(cache: EmbeddingCache, batch: Batch, pin: bool = False) -> dict[str, torch.Tensor]:
    """Stack a batch's cached tensors (bf16, CPU): posterior mean/std [B,16,h,w], T5 [B,L,D], CLIP [B,P]."""
    means, stds, t5s, clips = [], [], [], []
    for entry, drop in zip(batch.entries, batch.drop_caption):
        mean, std = cache.latent_dist(entry)
        t5, clip = cache.text(cache.empty_caption_id if drop else entry.caption_id)
        means.append(mean)
        stds.append(std)
        t5s.append(t5)
        clips.append(clip)
    out = {"mean": torch.stack(means), "std": torch.stack(stds), "t5": torch.stack(t5s), "clip": torch.stack(clips)}
    return {k: v.pin_memory() for k, v in out.items()} if pin else out


def prefetch(items: Iterator[T], load: Callable[[T], dict], depth: int = 2) -> Iterator[tuple[T, dict]]:
    """Load the next `depth` items on a background thread while the current step runs.

    Closing the returned generator (or leaving the `for` loop) stops and joins the thread.
    """
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(value: object) -> bool:
        while not stop.is_set():
            try:
                ready.put(value, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if stop.is_set() or not put((item, load(item))):
                    return
        except BaseException as err:  # surfaced in the training thread
            put(err)

    thread = threading.Thread(target=work, daemon=True, name="fluxlora-prefetch")
    thread.start()
    try:
        while True:
            got = ready.get()
            if isinstance(got, BaseException):
                raise got
            yield got
    finally:
        stop.set()
        thread.join()
