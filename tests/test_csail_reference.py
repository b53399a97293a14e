"""Import against CSAIL's own code (``mit-semseg`` from PyPI, installed without its dependencies).

The encoder (``resnet50dilated``) and decoder (``ppm_deepsup``) are built by ``mit_semseg.models`` itself, their
SynchronizedBatchNorm statistics moved by its own moving-average routine (what a multi-GPU ``train.py`` run
does), and saved as its ``train.py`` ``checkpoint()`` saves them: ``torch.save(net.state_dict(), ...)``. The
imported model must give CSAIL's inference probabilities (``SegmentationModule(..., segSize=...)``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.model.checkpoint import load_model
from pipeline.model.weights import WeightsError, import_checkpoint

mit = pytest.importorskip(
    "mit_semseg.models.models",
    reason="mit-semseg is not installed (make install adds it: pip install --no-deps)",
)
from mit_semseg.lib.nn import SynchronizedBatchNorm2d  # noqa: E402
from mit_semseg.models import resnet as mit_resnet  # noqa: E402

pytestmark = pytest.mark.slow  # full-size ResNet-50 encoder + PPM decoder, written and read back (about 20 s)
TOL = 1e-4
NUM_CLASSES = 7


def _move_statistics(net: torch.nn.Module, gen: torch.Generator, steps: int = 3) -> int:
    """Give every BN layer trained-looking weights and run CSAIL's own synchronised moving average on
    random batch sums (``_compute_mean_std``: what each multi-GPU training step calls)."""
    n = 0
    for m in net.modules():
        if isinstance(m, SynchronizedBatchNorm2d):
            c = m.num_features
            m.weight.data = 0.5 + torch.rand(c, generator=gen)
            m.bias.data = 0.1 * torch.randn(c, generator=gen)
            for _ in range(steps):
                size = 64
                mean = 0.2 * torch.randn(c, generator=gen)
                var = 0.5 + torch.rand(c, generator=gen)
                m._compute_mean_std(mean * size, (var + mean**2) * size, size)
            n += 1
    return n


@torch.no_grad()
def _temper_classifier(module: torch.nn.Module, decoder: torch.nn.Module) -> None:
    """Scale the final 1x1 classifier so the logits have std ~2: random deep weights otherwise saturate the
    softmax to one-hot, and a probability comparison would prove little."""
    feats = []
    hook = decoder.conv_last[3].register_forward_hook(lambda _m, _i, o: feats.append(o))
    module(
        {"img_data": torch.randn(1, 3, 65, 65, generator=torch.Generator().manual_seed(9))}, segSize=(65, 65)
    )
    hook.remove()
    std = decoder.conv_last[4](feats[0]).std().item()
    decoder.conv_last[4].weight.mul_(2.0 / std)
    decoder.conv_last[4].bias.mul_(2.0 / std)


@pytest.fixture(scope="module")
def csail_pair(tmp_path_factory) -> tuple[Path, Path, torch.nn.Module]:
    """``encoder_epoch_20.pth``, ``decoder_epoch_20.pth`` written by CSAIL's code, and its inference module."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    encoder = mit.ResnetDilated(mit_resnet.resnet50(pretrained=False), dilate_scale=8)
    decoder = mit.ModelBuilder.build_decoder(
        "ppm_deepsup", fc_dim=2048, num_class=NUM_CLASSES, use_softmax=True
    )
    assert _move_statistics(encoder, gen) > 50 and _move_statistics(decoder, gen) == 6
    module = mit.SegmentationModule(encoder, decoder, torch.nn.NLLLoss(ignore_index=-1)).eval()
    _temper_classifier(module, decoder)
    out = tmp_path_factory.mktemp("csail")
    enc_path, dec_path = out / "encoder_epoch_20.pth", out / "decoder_epoch_20.pth"
    torch.save(encoder.state_dict(), enc_path)  # train.py checkpoint(): net_encoder.state_dict()
    torch.save(decoder.state_dict(), dec_path)
    return enc_path, dec_path, module


def test_files_carry_the_sync_bn_buffers(csail_pair) -> None:
    enc_path, dec_path, _ = csail_pair
    enc = torch.load(enc_path, weights_only=True)
    assert {"bn1._tmp_running_mean", "bn1._tmp_running_var", "bn1._running_iter"} <= set(enc)
    assert enc["bn1._running_iter"].item() != 1.0  # the moving average ran: the consistency check is live
    dec = torch.load(dec_path, weights_only=True)
    assert "conv_last.1._tmp_running_var" in dec


@torch.no_grad()
def test_csail_real_checkpoint_imports_with_probability_parity(csail_pair, tmp_path: Path) -> None:
    enc_path, dec_path, module = csail_pair
    out = tmp_path / "csail.pt"
    import_checkpoint("csail", [enc_path, dec_path], out, num_classes=NUM_CLASSES)
    model, meta = load_model(out)
    assert meta["conventions"]["source"] == "csail" and model.aux is not None
    x = torch.randn(2, 3, 65, 81, generator=torch.Generator().manual_seed(5))
    ref = module({"img_data": x}, segSize=(65, 81))  # CSAIL's inference: softmax at segSize
    prob = model(x)["out"].softmax(1)
    assert prob.shape == ref.shape == (2, NUM_CLASSES, 65, 81)
    assert (prob - ref).abs().max().item() <= TOL
    # not a saturated, trivially equal output: the classes compete
    assert 0.2 < ref.max(1).values.mean().item() < 0.99
    # the deep-supervision head (training branch of PPMDeepsup, dropout off) on conv4 = layer3
    decoder = module.decoder
    conv4 = module.encoder(x, return_feature_maps=True)[-2]
    ref_aux = decoder.conv_last_deepsup(decoder.cbr_deepsup(conv4))
    aux = model.aux(model.layer3(model.layer2(model.layer1(model.layer0(x)))))
    assert (aux - ref_aux).abs().max().item() <= TOL * ref_aux.abs().max().item()


def test_inconsistent_sync_bn_buffers_are_refused(csail_pair, tmp_path: Path) -> None:
    enc_path, dec_path, _ = csail_pair
    enc = torch.load(enc_path, weights_only=True)
    enc["layer2.1.bn2._tmp_running_var"] *= 3.0
    bad = tmp_path / "encoder_bad.pth"
    torch.save(enc, bad)
    out = tmp_path / "never.pt"
    with pytest.raises(WeightsError, match=r"encoder_bad\.pth.*layer2\.1\.bn2.*disagree"):
        import_checkpoint("csail", [bad, dec_path], out)
    del enc["layer2.1.bn2._tmp_running_var"]
    torch.save(enc, bad)
    with pytest.raises(WeightsError, match=r"layer2\.1\.bn2.*incomplete"):
        import_checkpoint("csail", [bad, dec_path], out)
    assert not out.exists()
