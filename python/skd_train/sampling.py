"""Data order that can resume mid-epoch, with per-sample augmentation seeds.

The sampler yields (index, sample_seed) pairs: a DistributedSampler permutation (seed + epoch), from a
given position on. `SeededDataset` seeds the global Python/NumPy/torch generators from sample_seed
around each __getitem__, so a sample's augmentation depends only on (seed, epoch, position): the same
with or without workers, and after a resume.
"""
from __future__ import annotations

import random

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler, Sampler


class ResumableSampler(Sampler):
    """DistributedSampler order (shuffled, drop_last) for one epoch, starting at sample `start` of this rank."""

    def __init__(self, dataset, num_replicas: int, rank: int, seed: int, epoch: int, start: int = 0):
        self.base = DistributedSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=True,
                                       seed=seed, drop_last=True)
        self.base.set_epoch(epoch)
        self.seed, self.epoch, self.rank, self.start = seed, epoch, rank, start

    def __len__(self):
        return len(self.base) - self.start

    def __iter__(self):
        for pos, index in enumerate(self.base):
            if pos >= self.start:
                sample_seed = (self.seed * 1_000_003 + self.epoch * 10_007 + self.rank * 7_919 + pos) % 2**31
                yield index, sample_seed


class SeededDataset(Dataset):
    """Wraps a dataset: item (index, seed) -> dataset[index] drawn under seeded global generators
    (restored afterwards, so the training loop's own random stream is untouched)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, item):
        index, seed = item
        states = random.getstate(), np.random.get_state(), torch.get_rng_state()
        try:
            random.seed(seed)
            np.random.seed(seed)
            torch.manual_seed(seed)
            return self.dataset[index]
        finally:
            random.setstate(states[0])
            np.random.set_state(states[1])
            torch.set_rng_state(states[2])
