"""Captum-style targets, checked the same way everywhere in the package."""

from typing import Optional

import torch
from captum._utils.typing import TargetType
from torch import Tensor

__all__ = ["format_target", "check_target_range"]


def format_target(
    target: TargetType,
    batch_size: int,
    device: torch.device,
    num_outputs: Optional[int] = None,
) -> Optional[Tensor]:
    """Captum-style targets as a (B,) long tensor on ``device``, or None for the predicted
    classes; checked against ``num_outputs`` classes when known."""
    if target is None:
        return None
    if isinstance(target, Tensor):
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            raise TypeError(f"Expected integer targets, got a tensor of dtype {target.dtype}.")
        if target.numel() != 1 and target.dim() != 1:
            raise ValueError(
                f"Expected a target tensor with one element or one per example (1-D, "
                f"length {batch_size}), got shape {tuple(target.shape)}."
            )
        indices = target.reshape(-1).to(device=device, dtype=torch.long)
    elif isinstance(target, int) and not isinstance(target, bool):
        indices = torch.tensor([target], device=device)
    elif isinstance(target, (list, tuple)) and all(
        isinstance(item, int) and not isinstance(item, bool) for item in target
    ):
        if isinstance(target, tuple) and len(target) != 1:
            raise TypeError(
                "Expected an int, a list of ints or a 1-D tensor as target; a tuple selects "
                "a position in a multi-dimensional output, which class scores are not."
            )
        indices = torch.tensor(list(target), device=device, dtype=torch.long)
    else:
        raise TypeError(
            f"Expected target to be None, an int, a list of ints or a 1-D integer tensor, "
            f"got {target!r}."
        )
    if isinstance(target, list) or (isinstance(target, Tensor) and target.numel() != 1):
        if indices.numel() != batch_size:
            raise ValueError(
                f"Expected one target per example ({batch_size}), got {indices.numel()}."
            )
    low = int(indices.min())
    limit = f"0..{num_outputs - 1}" if num_outputs is not None else "non-negative"
    if low < 0:
        # Refused, not counted from the end: a negative label usually marks "no label".
        raise ValueError(
            f"Expected target classes in {limit}, got {low}. Negative indices are not counted "
            f"from the end (a data set's -1 or ignore_index -100 usually means no label); "
            f"give the class index itself."
        )
    if num_outputs is not None:
        check_target_range(indices, num_outputs)
    return indices.expand(batch_size)


def check_target_range(indices: Tensor, num_outputs: int) -> None:
    """Refuses target ``indices`` (non-negative, checked by :func:`format_target`) at or above
    ``num_outputs``: checked before the forward pass where the width of the forward's scores
    is known, else right after it against the scores' width, with the same message."""
    high = int(indices.max())
    if high >= num_outputs:
        raise ValueError(
            f"Expected target classes below the model's {num_outputs} outputs "
            f"(0..{num_outputs - 1}), got {high}."
        )
