"""Supervised loss: label smoothing as torch's, mixup / cutmix targets and images, top-k accuracy."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.objectives.classification import (MixConfig, accuracy_topk, batch_rng, classification_loss,
                                                mix_batch, smooth_one_hot)


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.3])
def test_label_smoothing_matches_torch(smoothing):
    torch.manual_seed(0)
    logits, labels = torch.randn(16, 10) * 3, torch.randint(0, 10, (16,))
    ref = F.cross_entropy(logits, labels, label_smoothing=smoothing)
    torch.testing.assert_close(classification_loss(logits, labels, smoothing), ref)
    soft = smooth_one_hot(labels, 10, smoothing)
    torch.testing.assert_close(soft.sum(1), torch.ones(16))
    torch.testing.assert_close(classification_loss(logits, soft), ref)  # the soft-target path agrees
    # bf16 logits are upcast before the softmax: the loss of the rounded logits, in fp32, at fp32's tolerance
    rounded = logits.bfloat16()
    bf16_loss = classification_loss(rounded, labels, smoothing)
    assert bf16_loss.dtype == torch.float32
    torch.testing.assert_close(bf16_loss, F.cross_entropy(rounded.float(), labels, label_smoothing=smoothing))


def test_mixup_images_and_targets():
    torch.manual_seed(0)
    images, labels = torch.randn(8, 3, 16, 16), torch.randint(0, 5, (8,))
    cfg = MixConfig(mixup_alpha=0.8, label_smoothing=0.1)
    mixed, targets, info = mix_batch(images, labels, 5, cfg, np.random.default_rng(0))
    lam = info["lam"]
    assert info["mode"] == "mixup" and 0 < lam < 1
    torch.testing.assert_close(mixed, lam * images + (1 - lam) * images.flip(0))
    torch.testing.assert_close(targets.sum(1), torch.ones(8))
    assert (targets >= 0).all()
    expected = lam * smooth_one_hot(labels, 5, 0.1) + (1 - lam) * smooth_one_hot(labels.flip(0), 5, 0.1)
    torch.testing.assert_close(targets, expected)
    from timm.data.mixup import mixup_target  # the same soft targets as timm's Mixup for this lambda
    torch.testing.assert_close(targets, mixup_target(labels, 5, lam, 0.1).float())


def test_cutmix_box_and_corrected_lambda():
    images, labels = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 3, 20, 24).clone(), torch.tensor([0, 1, 2, 3])
    cfg = MixConfig(cutmix_alpha=1.0)
    modes = set()
    for seed in range(20):
        mixed, targets, info = mix_batch(images, labels, 4, cfg, np.random.default_rng(seed))
        modes.add(info["mode"])
        own = (mixed == images).all(1).float().mean((1, 2))  # share of each image that is still its own
        torch.testing.assert_close(own, torch.full((4,), info["lam"]), atol=1e-6, rtol=0)
        assert (mixed[0][mixed[0] != 0] == 3).all()  # the pasted box comes from the mirror image
        torch.testing.assert_close(targets.sum(1), torch.ones(4))
        torch.testing.assert_close(targets[0, 0], torch.tensor(info["lam"], dtype=torch.float32))
    assert modes == {"cutmix"}
    assert torch.equal(images, torch.arange(4.0).view(4, 1, 1, 1).expand(4, 3, 20, 24))  # input untouched


def test_switch_prob_and_skip():
    images, labels = torch.randn(4, 3, 8, 8), torch.arange(4)
    cfg = MixConfig(mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.5, switch_prob=0.5, label_smoothing=0.1)
    modes = [mix_batch(images, labels, 4, cfg, batch_rng(0, i))[2]["mode"] for i in range(200)]
    counts = {m: modes.count(m) for m in ("none", "mixup", "cutmix")}
    assert 70 < counts["none"] < 130 and 25 < counts["mixup"] < 75 and 25 < counts["cutmix"] < 75
    mixed, targets, info = mix_batch(images, labels, 4, MixConfig(label_smoothing=0.1), batch_rng(0, 1))
    assert info["mode"] == "none" and mixed is images
    torch.testing.assert_close(targets, smooth_one_hot(labels, 4, 0.1))
    with pytest.raises(ValueError, match="even"):
        mix_batch(images[:3], labels[:3], 4, cfg, batch_rng(0, 0))


def test_mix_is_a_function_of_the_batch_position():
    images, labels = torch.randn(4, 3, 8, 8), torch.arange(4)
    cfg = MixConfig(mixup_alpha=0.8, cutmix_alpha=1.0)
    a = mix_batch(images, labels, 4, cfg, batch_rng(7, 3, 1024, 1))
    b = mix_batch(images, labels, 4, cfg, batch_rng(7, 3, 1024, 1))
    c = mix_batch(images, labels, 4, cfg, batch_rng(7, 3, 1024, 0))
    assert torch.equal(a[0], b[0]) and a[2] == b[2] and a[2] != c[2]


def test_accuracy_topk():
    logits = torch.tensor([[0.1, 0.9, 0.0, 0.0, 0.0, 0.0],
                           [0.9, 0.1, 0.5, 0.0, 0.0, 0.0],
                           [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
                           [0.6, 0.5, 0.4, 0.3, 0.2, 0.1]])
    labels = torch.tensor([1, 2, 1, 5])
    acc = accuracy_topk(logits, labels, ks=(1, 2, 5))
    assert acc == {1: 0.25, 2: 0.5, 5: 0.75}
    assert accuracy_topk(logits[:, :3], torch.tensor([1, 2, 1, 0]), ks=(1, 5))[5] == 1.0  # k capped at classes
    soft = F.one_hot(labels, 6).float() * 0.7 + 0.05
    assert accuracy_topk(logits, soft, ks=(1,)) == {1: 0.25}
