"""Frozen BatchNorm as a per-channel multiply-add while fine-tuning (models/freezing.py)."""

import pytest
import torch

from transferlab.models.backbones import create_backbone
from transferlab.models.freezing import batchnorm_as_affine, keep_inference_mode

from conftest import TINY_BACKBONE


def loss_and_gradients(backbone, images, affine: bool):
    backbone.zero_grad(set_to_none=True)
    if affine:
        with batchnorm_as_affine(backbone):
            assert any("forward" in vars(m) for m in backbone.modules())
            features = backbone(images)
    else:
        features = backbone(images)
    loss = features.square().mean()
    loss.backward()  # after the block: the recorded graph must still hold the affine ops
    return loss.detach(), {name: p.grad.clone() for name, p in backbone.named_parameters()
                           if p.grad is not None}


@pytest.mark.parametrize("channels_last", [False, True])
def test_frozen_batchnorm_as_affine_gives_the_same_outputs_and_gradients(channels_last):
    torch.manual_seed(0)
    backbone = create_backbone(TINY_BACKBONE, "none").train()
    for module in backbone.modules():  # statistics that are not the identity, so a slip would show
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    keep_inference_mode(backbone, freeze_batchnorm=True)
    images = torch.randn(4, 3, 32, 32)
    if channels_last:
        backbone, images = (backbone.to(memory_format=torch.channels_last),
                            images.contiguous(memory_format=torch.channels_last))
    state = {k: v.clone() for k, v in backbone.state_dict().items()}
    loss, gradients = loss_and_gradients(backbone, images, affine=False)
    affine_loss, affine_gradients = loss_and_gradients(backbone, images, affine=True)
    assert torch.allclose(loss, affine_loss, rtol=1e-5)
    assert gradients.keys() == affine_gradients.keys() and len(gradients) > 0
    for name, gradient in gradients.items():
        assert torch.allclose(gradient, affine_gradients[name], rtol=1e-4, atol=1e-6), name
    # nothing changed outside the block: forward, state (running statistics included)
    assert all("forward" not in vars(m) for m in backbone.modules())
    assert all(torch.equal(v, state[k]) for k, v in backbone.state_dict().items())


def test_batchnorm_in_training_mode_is_left_alone():
    backbone = create_backbone(TINY_BACKBONE, "none").train()  # BatchNorm still learns statistics
    with batchnorm_as_affine(backbone):
        assert all("forward" not in vars(m) for m in backbone.modules())
