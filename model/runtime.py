"""Small torch-side helpers for processes that host the model (threads, devices, tensor hand-off)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch


def configure_threads(num_threads: int | None) -> None:
    """Pin torch's intra-op threads (so two workers on one machine don't oversubscribe its cores)."""
    if num_threads is not None:
        if num_threads < 1:
            raise ValueError(f"torch threads must be ≥ 1, got {num_threads}")
        torch.set_num_threads(num_threads)


def cuda_available() -> bool:
    return torch.cuda.is_available()


def tensor_from_numpy(array: np.ndarray) -> torch.Tensor:
    """A writable torch copy of an array that may be a read-only view into Ray's object store."""
    return torch.tensor(array)


def tensors_from_numpy(arrays: Mapping[int, np.ndarray]) -> dict[int, torch.Tensor]:
    return {k: tensor_from_numpy(v) for k, v in arrays.items()}


def is_fatal_device_error(exc: BaseException) -> bool:
    text = str(exc)
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "CUDA error" in text or "CUBLAS_STATUS" in text
