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


def test_eval_transform_gives_timms_pixels_from_torchs_resampling():
    """ResizeCenterCrop against timm's own transform (PIL's resize) on photo-like images that are
    upscaled, downscaled, already at the resize size, portrait and landscape."""
    import numpy as np
    from PIL import Image, ImageFilter
    from timm.data import create_transform

    from transferlab.data.transforms import ResizeCenterCrop, eval_transform

    rng = np.random.default_rng(0)
    for pre in (Preprocessing(), Preprocessing(input_size=(3, 96, 96), interpolation="bilinear",
                                               crop_pct=0.9)):
        ours = eval_transform(pre)
        assert isinstance(ours, ResizeCenterCrop)
        timm = create_transform(input_size=pre.input_size, interpolation=pre.interpolation,
                                crop_pct=pre.crop_pct, is_training=False, use_prefetcher=True)
        for width, height in ((150, 131), (131, 150), (640, 480), (300, 1000),
                              (pre.resize_size, 300), (pre.resize_size, pre.resize_size)):
            noise = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            image = Image.fromarray(noise).filter(ImageFilter.GaussianBlur(2))  # photo-like
            got, expected = ours(image), timm(image)
            assert got.dtype == torch.uint8 and got.shape == expected.shape == pre.input_size
            difference = (got.int() - expected.int()).abs()
            assert difference.max() <= 2 and difference.float().mean() < 0.25, (width, height)


def test_eval_transform_leaves_other_crop_modes_and_filters_to_timm():
    from transferlab.data.transforms import ResizeCenterCrop, eval_transform

    for pre in (Preprocessing(crop_mode="squash"), Preprocessing(interpolation="lanczos"),
                Preprocessing(input_size=(3, 224, 160)), Preprocessing(crop_pct=1.2)):
        assert not isinstance(eval_transform(pre), ResizeCenterCrop), pre
