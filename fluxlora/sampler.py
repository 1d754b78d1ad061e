"""Training data order: single-bucket batches from the cache, split across processes, resumable.

The order is a pure function of the seed: an endless stream of epochs, each a shuffled list of
batches, every batch drawn from one bucket (one latent shape). Batch i of the stream goes to process
i % world_size, so no image is duplicated or dropped within an epoch, and the stream position (a
count of global batches) is all a checkpoint must keep; it resumes on any number of processes.
"""
from __future__ import annotations

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
    """One bucket's entries and, per entry, whether its caption is dropped (empty caption)."""

    position: int  # index of this batch in the global stream
    entries: tuple[ImageEntry, ...]
    drop_caption: tuple[bool, ...]


class BucketBatchStream:
    def __init__(self, entries: Sequence[ImageEntry], batch_size: int, seed: int, *, repeats: int = 1,
                 caption_dropout: float = 0.0):
        if not entries:
            raise ValueError("the cache holds no images for the chosen --resolutions")
        self.entries = list(entries)
        self.batch_size = batch_size
        self.seed = seed
        self.repeats = repeats
        self.caption_dropout = caption_dropout
        self._epoch: tuple[int, list[Batch]] | None = None
        self.batches_per_epoch = len(self._make_epoch(0))

    def _make_epoch(self, epoch: int) -> list[Batch]:
        rng = random.Random(f"{self.seed}:{epoch}")
        by_bucket: dict[tuple[int, int], list[int]] = defaultdict(list)
        for index, entry in enumerate(self.entries):
            by_bucket[(entry.width, entry.height)].extend([index] * self.repeats)
        chunks: list[list[int]] = []
        for bucket in sorted(by_bucket):
            indices = by_bucket[bucket]
            rng.shuffle(indices)
            chunks += [indices[i:i + self.batch_size] for i in range(0, len(indices), self.batch_size)]
        rng.shuffle(chunks)
        first = epoch * len(chunks)
        return [Batch(first + i, tuple(self.entries[j] for j in chunk),
                      tuple(rng.random() < self.caption_dropout for _ in chunk))
                for i, chunk in enumerate(chunks)]

    def batch(self, position: int) -> Batch:
        epoch, offset = divmod(position, self.batches_per_epoch)
        if self._epoch is None or self._epoch[0] != epoch:
            self._epoch = (epoch, self._make_epoch(epoch))
        return self._epoch[1][offset]

    def epoch_of(self, position: int) -> int:
        return position // self.batches_per_epoch

    def iterate(self, start: int, rank: int, world_size: int) -> Iterator[Batch]:
        """This process's batches from global position `start` (a multiple of world_size) on."""
        position = start + rank
        while True:
            yield self.batch(position)
            position += world_size


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
