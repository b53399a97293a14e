"""Known answers for the PSPNet loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.training.losses import check_finite, pspnet_loss


def make(n: int = 2, c: int = 4, h: int = 5, w: int = 6) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    outputs = {"out": torch.randn(n, c, h, w, generator=g), "aux": torch.randn(n, c, h, w, generator=g)}
    target = torch.randint(0, c, (n, h, w), generator=g)
    return outputs, target


def test_aux_weight_zero_is_plain_ce() -> None:
    outputs, target = make()
    loss, logs = pspnet_loss(outputs, target, aux_weight=0.0)
    expected = F.cross_entropy(outputs["out"], target)
    assert torch.allclose(loss, expected)
    assert float(logs["loss_aux"]) == 0.0
    assert float(logs["loss"]) == pytest.approx(float(expected))


def test_aux_term_is_weighted() -> None:
    outputs, target = make()
    loss, logs = pspnet_loss(outputs, target, aux_weight=0.4)
    main = F.cross_entropy(outputs["out"], target)
    aux = F.cross_entropy(outputs["aux"], target)
    assert torch.allclose(loss, main + 0.4 * aux)
    assert float(logs["loss_main"]) == pytest.approx(float(main))
    assert float(logs["loss_aux"]) == pytest.approx(float(aux))
    assert float(logs["loss"]) == pytest.approx(float(main + 0.4 * aux))


def test_parts_stay_on_the_device_as_tensors() -> None:
    """Issue 27: no host sync per training step: the parts are detached 0-dim tensors, read when logged."""
    outputs, target = make()
    target[0, 0] = 255
    _, logs = pspnet_loss(outputs, target, aux_weight=0.4)
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 and not v.requires_grad for v in logs.values())
    assert int(logs["labelled"]) == target.numel() - target.shape[2]


def test_no_aux_output_skips_term() -> None:
    outputs, target = make()
    loss, logs = pspnet_loss({"out": outputs["out"]}, target, aux_weight=0.4)
    assert torch.allclose(loss, F.cross_entropy(outputs["out"], target))
    assert float(logs["loss_aux"]) == 0.0


def test_ignore_pixels_excluded() -> None:
    outputs, target = make()
    ignored = target.clone()
    ignored[:, :2] = 255
    loss, _ = pspnet_loss(outputs, ignored, aux_weight=0.0)
    keep = ignored != 255
    logits = outputs["out"].permute(0, 2, 3, 1)[keep]  # (P, C)
    expected = F.cross_entropy(logits, ignored[keep])
    assert torch.allclose(loss, expected)
    # changing the logits at ignored pixels does not change the loss
    changed = outputs["out"].clone()
    changed[:, :, :2] = 100.0
    loss2, _ = pspnet_loss({"out": changed}, ignored, aux_weight=0.0)
    assert torch.allclose(loss, loss2)


def test_custom_ignore_index() -> None:
    outputs, target = make()
    target[0, 0, 0] = -1
    loss, _ = pspnet_loss(outputs, target, aux_weight=0.0, ignore_index=-1)
    assert torch.isfinite(loss)


def test_gradient_flows() -> None:
    outputs, target = make()
    out = outputs["out"].requires_grad_()
    loss, _ = pspnet_loss({"out": out, "aux": outputs["aux"]}, target, aux_weight=0.4)
    loss.backward()
    assert out.grad is not None and torch.isfinite(out.grad).all()


def _checked(outputs, target, aux_weight: float, iteration: int = 7) -> None:
    _, parts = pspnet_loss(outputs, target, aux_weight=aux_weight)
    check_finite({k: float(v) for k, v in parts.items()}, iteration)


def test_nan_raises_floating_point_error_with_the_iteration() -> None:
    outputs, target = make()
    _checked(outputs, target, 0.4)  # finite: no error
    outputs["out"][0, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="iteration 7: loss is not finite"):
        _checked(outputs, target, 0.4)


def test_nan_in_aux_raises() -> None:
    outputs, target = make()
    outputs["aux"][0, 0, 0, 0] = float("inf")
    with pytest.raises(FloatingPointError):
        _checked(outputs, target, 0.4)


def test_all_ignored_raises_with_hint() -> None:
    outputs, target = make()
    with pytest.raises(FloatingPointError, match="ignore_index"):
        _checked(outputs, torch.full_like(target, 255), 0.0)


def test_bad_target() -> None:
    outputs, target = make()
    with pytest.raises(ValueError, match="int64"):
        pspnet_loss(outputs, target.float(), aux_weight=0.0)
    with pytest.raises(ValueError, match="does not match"):
        pspnet_loss(outputs, target[:, :3], aux_weight=0.0)
