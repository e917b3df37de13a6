"""Per-dataset input normalisation: scale to [0, 1], then standardise per channel."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Normalisation:
    """Per-channel ``(x - mean) / std`` applied after scaling to [0, 1]."""

    mean: tuple[float, ...]
    std: tuple[float, ...]


MNIST_NORM = Normalisation((0.1307,), (0.3081,))
FASHION_MNIST_NORM = Normalisation((0.2860,), (0.3530,))
CIFAR10_NORM = Normalisation((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
# load_digits().data / 16 over all 1,797 images x 64 pixels: mean 0.30526, std 0.37605.
DIGITS_NORM = Normalisation((0.3053,), (0.3760,))


def train_statistics(x: np.ndarray) -> Normalisation:
    """Mean and std per channel (images) or per column (vectors); a zero std becomes 1."""
    axes = tuple(a for a in range(x.ndim) if a != 1)
    mean = x.mean(axis=axes, dtype=np.float64)
    std = x.std(axis=axes, dtype=np.float64)
    std[std == 0] = 1.0
    return Normalisation(tuple(float(m) for m in mean), tuple(float(s) for s in std))


def standardise(x: np.ndarray, norm: Normalisation) -> np.ndarray:
    """``(x - mean) / std`` with mean and std broadcast along axis 1, as float32."""
    shape = (1, -1) + (1,) * (x.ndim - 2)
    mean = np.asarray(norm.mean, dtype=np.float32).reshape(shape)
    std = np.asarray(norm.std, dtype=np.float32).reshape(shape)
    return ((x - mean) / std).astype(np.float32, copy=False)
