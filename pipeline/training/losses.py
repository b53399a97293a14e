"""PSPNet's training loss (Sec. 4): pixel-wise cross-entropy plus a weighted auxiliary term.

    loss = CE(out, target) + aux_weight * CE(aux, target)      # aux_weight = 0.4 in the paper

Both logits are at the label resolution already (the model upsamples them); pixels equal to
``ignore_index`` do not count.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor


def pspnet_loss(
    outputs: dict[str, Tensor],
    target: Tensor,
    aux_weight: float,
    ignore_index: int = 255,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Cross-entropy on ``outputs["out"]`` plus ``aux_weight`` times the one on ``outputs["aux"]``.

    Args:
        outputs: the model's output; ``"out"`` logits (N, C, H, W), optional ``"aux"`` logits (N, C, H, W).
        target: class indices (N, H, W), int64; ``ignore_index`` marks pixels without a label.
        aux_weight: weight of the auxiliary loss; the term is skipped when 0 or when there is no ``"aux"``.
        ignore_index: label value excluded from the loss.

    Returns:
        The total loss (a scalar with grad) and its detached parts ``{"loss", "loss_main", "loss_aux",
        "labelled"}`` as 0-dim tensors on the loss's device (``loss_aux`` is 0 when the term is skipped;
        ``labelled``: the pixels that count). Nothing is copied to the host: the training loop reads the parts
        when it logs them, and checks them with :func:`check_finite`.

    Raises:
        ValueError: missing ``"out"``, a target that is not int64 or whose shape does not match the logits.
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
    loss_aux = torch.zeros((), dtype=loss_main.dtype, device=loss_main.device)
    if aux_weight > 0 and "aux" in outputs:
        loss_aux = F.cross_entropy(outputs["aux"], target, ignore_index=ignore_index)
        loss = loss + aux_weight * loss_aux
    parts = {
        "loss": loss.detach(),
        "loss_main": loss_main.detach(),
        "loss_aux": loss_aux.detach(),
        "labelled": (target != ignore_index).sum(),
    }
    return loss, parts


def check_finite(values: Mapping[str, float], iteration: int) -> None:
    """Raise ``FloatingPointError`` when the loss of ``iteration`` (its parts read as floats) is not finite:
    a diverged model, or a batch whose pixels are all ``ignore_index``."""
    if math.isfinite(values["loss"]):
        return
    hint = " (every pixel of the batch is ignore_index)" if values["labelled"] == 0 else ""
    raise FloatingPointError(
        f"iteration {iteration}: loss is not finite: loss={values['loss']}, loss_main={values['loss_main']}, "
        f"loss_aux={values['loss_aux']}{hint}"
    )
