"""Plaintext twins of :mod:`mpc_fi.secure`, with the same fixed-point encoding and tie rule."""

from __future__ import annotations

import torch


def encode(x: torch.Tensor, precision_bits: int) -> torch.Tensor:
    """CrypTen's fixed-point encoding of a float tensor: ``(x * 2**bits).long()`` (truncation)."""
    return (x.to(torch.float64) * (1 << precision_bits)).long()


def argmax_lowest(x: torch.Tensor) -> torch.Tensor:
    """Index of the maximum along the last dimension, lowest index among equal values."""
    # torch.argmax documents that it returns the first maximal index.
    return torch.argmax(x, dim=-1)


def top_two_margin(x: torch.Tensor) -> torch.Tensor:
    """Difference between the largest and second-largest entry of each row."""
    top = torch.topk(x.to(torch.float64), 2, dim=-1).values
    return top[..., 0] - top[..., 1]
