"""training.kernels: the depthwise convolutions bf16 training computes in fp32 on the CPU."""

import torch
from torch import nn

from transferlab.training.kernels import Float32DepthwiseConv2d, fp32_where_bf16_is_slower


def network() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 5, padding=2, groups=8),  # slower
                         nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8),  # slower
                         nn.Conv2d(8, 8, 3, padding=1, groups=8),  # faster in bf16: kept
                         nn.Conv2d(8, 16, 3, padding=1, groups=2),  # grouped, not depthwise
                         nn.AdaptiveAvgPool2d(1), nn.Flatten())


def test_only_slow_depthwise_layers_compute_in_fp32_and_only_inside():
    net = network()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with fp32_where_bf16_is_slower(net, "bf16", "cpu") as count:
        assert count == 2
        assert [type(layer) is Float32DepthwiseConv2d for layer in net[:5]] == [
            False, True, True, False, False]
        assert net.state_dict().keys() == before.keys()  # checkpoints unchanged
        x = torch.randn(2, 3, 16, 16, requires_grad=True)
        with torch.autocast("cpu", torch.bfloat16):
            inner = net[1](net[0](x))
            assert inner.dtype == torch.float32 and net[0](x).dtype == torch.bfloat16
            net(x).float().sum().backward()
        assert net[1].weight.grad is not None and x.grad is not None
    assert all(type(layer) in (nn.Conv2d, nn.AdaptiveAvgPool2d, nn.Flatten) for layer in net)
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key])


def test_nothing_changes_outside_bf16_on_the_cpu():
    for precision, accelerator in (("32", "cpu"), ("bf16", "gpu"), ("16", "cpu")):
        net = network()
        with fp32_where_bf16_is_slower(net, precision, accelerator) as count:
            assert count == 0 and not any(isinstance(m, Float32DepthwiseConv2d) for m in net.modules())


def test_layers_are_restored_when_training_fails():
    net = network()
    try:
        with fp32_where_bf16_is_slower(net, "bf16", "cpu"):
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        pass
    assert not any(isinstance(m, Float32DepthwiseConv2d) for m in net.modules())
