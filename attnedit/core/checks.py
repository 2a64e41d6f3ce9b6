"""Argument checks of the public API: each wrong value is one ``ValueError`` that names the argument and the value.

Called at the boundary (constructors, operations), before any model runs, so a bad value never surfaces as a
``TypeError`` / ``ZeroDivisionError`` from deep inside, nor as a NaN image. ``as_mask`` turns what users pass as a
spatial mask (tensor, numpy array, PIL image, nested list) into one tensor.

>>> check_real("scale", 2.0, low=0.0, low_open=True)
2.0
>>> check_real("scale", float("inf"), low=0.0)
Traceback (most recent call last):
ValueError: scale=inf must be >= 0 and finite
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np
import torch


def is_int(value: Any) -> bool:
    """True for an integer (Python or numpy), False for bools and floats."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_real(name: str, value: Any, low: float | None = None, high: float | None = None, *,
               low_open: bool = False, high_open: bool = False) -> float:
    """``float(value)`` when it is a finite real number within the bounds; ValueError naming ``name`` otherwise."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        if low is not None and high is not None:
            where = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        elif low is not None or high is not None:
            where = f"{'>' if low_open else '>='} {low:g} and finite" if low is not None else \
                f"{'<' if high_open else '<='} {high:g} and finite"
        else:
            where = "a finite number"
        raise ValueError(f"{name}={value!r} must be {where}")
    return float(value)


def check_int(name: str, value: Any, low: int | None = None, high: int | None = None) -> int:
    """``int(value)`` when it is an integer in ``[low, high]``; ValueError naming ``name`` otherwise."""
    if not is_int(value) or (low is not None and value < low) or (high is not None and value > high):
        where = f" in {low}..{high}" if low is not None and high is not None else f" >= {low}" if low is not None else ""
        raise ValueError(f"{name}={value!r} must be an integer{where}")
    return int(value)


def check_size(name: str, size: Any) -> tuple[int, int]:
    """``(H, W)`` of two positive integers."""
    if not isinstance(size, (tuple, list, torch.Size)) or len(size) != 2 or not all(is_int(s) and s > 0 for s in size):
        raise ValueError(f"{name}={size!r} must be (H, W), two positive integers")
    return int(size[0]), int(size[1])


def as_mask(value: Any, name: str = "mask", ndims: tuple[int, ...] = (2, 3)) -> torch.Tensor:
    """A spatial mask as a tensor with values in [0, 1] (1 = masked), from a tensor, array, PIL image or nested list.

    Integer data above 1 is 8-bit (divided by 255), as PIL images are; bool and float tensors are kept as they are.
    Empty masks, NaN / infinite values, values outside [0, 1] and shapes of another rank are refused.
    """
    if isinstance(value, torch.Tensor):
        mask = value.detach() if value.requires_grad else value
    else:
        if type(value).__module__.startswith("PIL."):
            value = np.asarray(value.convert("L"))
        if isinstance(value, (list, tuple)):
            try:
                value = np.asarray(value, dtype=np.float32)
            except (ValueError, TypeError):
                raise ValueError(f"{name}= is a ragged or non-numeric nested list; give equal-length rows of numbers") from None
        if not isinstance(value, np.ndarray) or value.dtype.kind not in "biuf":
            kind = type(value).__name__ if not isinstance(value, np.ndarray) else f"array of {value.dtype}"
            raise ValueError(f"{name}= must be a tensor, numpy array, PIL image or nested list of numbers; got {kind}")
        mask = torch.from_numpy(np.array(value))  # a copy: PIL arrays are read-only
    if mask.ndim not in ndims or mask.numel() == 0:
        shapes = " or ".join({2: "(H, W)", 3: "(F, H, W)"}[n] for n in ndims)
        raise ValueError(f"{name}= must be {shapes} and non-empty, got shape {tuple(mask.shape)}")
    if mask.is_complex():
        raise ValueError(f"{name}= has dtype {mask.dtype}; give bool, integer or float values in [0, 1]")
    if mask.dtype != torch.bool and not mask.is_floating_point() and int(mask.max()) > 1:
        mask = mask.float() / 255
    if mask.is_floating_point():
        if not bool(torch.isfinite(mask).all()):
            raise ValueError(f"{name}= holds NaN or infinite values")
        low, high = float(mask.min()), float(mask.max())
        if low < 0 or high > 1:
            raise ValueError(f"{name}= values must be in [0, 1] (1 = masked) or 8-bit 0..255; they span {low:g}..{high:g}")
    elif mask.dtype != torch.bool and int(mask.min()) < 0:
        raise ValueError(f"{name}= values must be in [0, 1] (1 = masked) or 8-bit 0..255; found {int(mask.min())}")
    return mask
