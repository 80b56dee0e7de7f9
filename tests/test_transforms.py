import torch

from transferlab.data.transforms import Preprocessing, normalize


def test_normalize_matches_the_textbook_formula_in_channels_last():
    pre = Preprocessing(mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    batch = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    expected = (batch.float() / 255 - torch.tensor(pre.mean).view(1, 3, 1, 1)) / torch.tensor(
        pre.std).view(1, 3, 1, 1)
    result = normalize(batch, pre)
    assert torch.allclose(result, expected, atol=1e-5)
    assert result.is_contiguous(memory_format=torch.channels_last)
    assert normalize(batch, pre, channels_last=False).is_contiguous()


def test_augmentation_presets_give_model_sized_uint8_and_vary():
    import numpy as np
    import pytest
    from PIL import Image

    from transferlab.errors import ConfigError
    from transferlab.data.transforms import train_transform
    from transferlab.options import AUGMENTATIONS

    pre = Preprocessing(input_size=(3, 64, 64))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8))
    for preset in AUGMENTATIONS:
        transform = train_transform(pre, preset)
        torch.manual_seed(0)
        first, second = transform(image), transform(image)
        assert first.dtype == torch.uint8 and first.shape == (3, 64, 64), preset
        assert torch.equal(first, second) == (preset == "none"), preset
    with pytest.raises(ConfigError, match="augment='wild'"):
        train_transform(pre, "wild")
