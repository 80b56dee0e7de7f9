import torch

from transferlab.transforms import Preprocessing, normalize


def test_normalize_matches_the_textbook_formula_in_channels_last():
    pre = Preprocessing(mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    batch = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    expected = (batch.float() / 255 - torch.tensor(pre.mean).view(1, 3, 1, 1)) / torch.tensor(
        pre.std).view(1, 3, 1, 1)
    result = normalize(batch, pre)
    assert torch.allclose(result, expected, atol=1e-5)
    assert result.is_contiguous(memory_format=torch.channels_last)
    assert normalize(batch, pre, channels_last=False).is_contiguous()
