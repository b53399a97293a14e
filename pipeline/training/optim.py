"""SGD with the paper's poly learning rate (Sec. 5.1) and two parameter groups.

    lr(it) = base_lr * (1 - it / max_iter) ** power          # stepped every iteration
    backbone (layer0..layer4): lr(it);  new layers (ppm, cls, aux): lr(it) * head_lr_mult

semseg's optimiser (pspnet_reference.yaml ``semseg_hszhao.optimizer``): SGD(momentum 0.9, wd 1e-4 on all
parameters), ppm/cls/aux at 10x the base learning rate.
"""

from __future__ import annotations

import torch
from torch import nn


def poly_lr(base_lr: float, iteration: int, max_iter: int, power: float) -> float:
    """The learning rate at ``iteration`` (0-based) of ``max_iter``."""
    if not 0 <= iteration < max_iter:
        raise ValueError(f"iteration {iteration} outside [0, {max_iter})")
    return base_lr * (1.0 - iteration / max_iter) ** power


def build_optimizer(
    model: nn.Module, *, base_lr: float, momentum: float, weight_decay: float, head_lr_mult: float
) -> torch.optim.SGD:
    """SGD over the model's backbone and head parameters; group 0 is the backbone, group 1 the head."""
    groups = [
        {"params": list(model.backbone_parameters()), "lr_mult": 1.0},
        {"params": list(model.head_parameters()), "lr_mult": head_lr_mult},
    ]
    named = {id(p) for g in groups for p in g["params"]}
    missing = [n for n, p in model.named_parameters() if id(p) not in named]
    if missing:
        raise ValueError(f"parameters in neither the backbone nor the head group: {missing[:5]}")
    for g in groups:
        g["lr"] = base_lr * g["lr_mult"]
    return torch.optim.SGD(groups, lr=base_lr, momentum=momentum, weight_decay=weight_decay)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Apply ``lr`` to every group, scaled by the group's ``lr_mult``."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_mult", 1.0)
