"""PSPNet's training loss (Sec. 4): pixel-wise cross-entropy plus a weighted auxiliary term.

    loss = CE(out, target) + aux_weight * CE(aux, target)      # aux_weight = 0.4 in the paper

Both logits are at the label resolution already (the model upsamples them); pixels equal to
``ignore_index`` do not count.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def pspnet_loss(
    outputs: dict[str, Tensor],
    target: Tensor,
    aux_weight: float,
    ignore_index: int = 255,
) -> tuple[Tensor, dict[str, float]]:
    """Cross-entropy on ``outputs["out"]`` plus ``aux_weight`` times the one on ``outputs["aux"]``.

    Args:
        outputs: the model's output; ``"out"`` logits (N, C, H, W), optional ``"aux"`` logits (N, C, H, W).
        target: class indices (N, H, W), int64; ``ignore_index`` marks pixels without a label.
        aux_weight: weight of the auxiliary loss; the term is skipped when 0 or when there is no ``"aux"``.
        ignore_index: label value excluded from the loss.

    Returns:
        The total loss (a scalar with grad) and detached floats ``{"loss", "loss_main", "loss_aux"}``
        (``loss_aux`` is 0.0 when the term is skipped).

    Raises:
        ValueError: missing ``"out"``, a target that is not int64 or whose shape does not match the logits.
        FloatingPointError: the loss is not finite (a diverged model, or a batch whose pixels are all
            ignored); the caller adds the iteration number.
    """
    if "out" not in outputs:
        raise ValueError(f"outputs must contain 'out' logits, got keys {sorted(outputs)}")
    logits = outputs["out"]
    if target.dtype != torch.long:
        raise ValueError(f"target must be int64 class indices, got dtype {target.dtype}")
    if target.dim() != 3 or logits.dim() != 4 or target.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(
            f"target shape {tuple(target.shape)} does not match logits {tuple(logits.shape)}; "
            "expected target (N, H, W) for logits (N, C, H, W)"
        )

    loss_main = F.cross_entropy(logits, target, ignore_index=ignore_index)
    loss = loss_main
    loss_aux_value = 0.0
    if aux_weight > 0 and "aux" in outputs:
        loss_aux = F.cross_entropy(outputs["aux"], target, ignore_index=ignore_index)
        loss = loss + aux_weight * loss_aux
        loss_aux_value = float(loss_aux.detach())

    total = float(loss.detach())
    if not math.isfinite(total):
        valid = int((target != ignore_index).sum())
        hint = " (every pixel of the batch is ignore_index)" if valid == 0 else ""
        raise FloatingPointError(
            f"loss is not finite: loss={total}, loss_main={float(loss_main.detach())}, "
            f"loss_aux={loss_aux_value}{hint}"
        )
    return loss, {"loss": total, "loss_main": float(loss_main.detach()), "loss_aux": loss_aux_value}
