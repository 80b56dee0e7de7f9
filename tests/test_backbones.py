import pytest
import torch

from transferlab.models.backbones import ALIASES, create_backbone, resolve_name, weights_fingerprint
from transferlab.errors import ConfigError, WeightsError
from transferlab.data.transforms import Preprocessing

from conftest import TINY_BACKBONE


def test_aliases_and_timm_names_resolve():
    import timm

    for alias, name in ALIASES.items():
        assert timm.is_model(name), alias
    assert resolve_name("resnet50").startswith("resnet50")
    assert resolve_name(TINY_BACKBONE) == TINY_BACKBONE
    with pytest.raises(ConfigError, match="did you mean"):
        resolve_name("resnet5O")


def test_random_backbone_gives_pooled_features_and_preprocessing():
    model = create_backbone(TINY_BACKBONE, weights="none").eval()
    with torch.no_grad():
        features = model(torch.zeros(2, 3, 64, 64))
    assert features.shape == (2, model.num_features)
    pre = Preprocessing.from_model(model)
    assert pre.input_size == (3, 160, 160) and pre.resize_size == int(160 / 0.95)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_weights_load_with_or_without_classifier(tmp_path, suffix):
    import timm
    from safetensors.torch import save_file

    source = timm.create_model(TINY_BACKBONE)  # with its 1000-class classifier
    path = tmp_path / f"weights{suffix}"
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save({"state_dict": state}, path)
    model = create_backbone(TINY_BACKBONE, weights=str(path))
    expected = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())
    assert weights_fingerprint(model) != weights_fingerprint(create_backbone(TINY_BACKBONE, "none"))


def test_mismatched_weights_name_what_differs(tmp_path):
    from safetensors.torch import save_file

    state = create_backbone(TINY_BACKBONE, "none").state_dict()
    state = {k: v.contiguous() for k, v in state.items()}
    state.pop("conv_stem.weight")
    state["bn1.weight"] = torch.zeros(3)
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path))
    with pytest.raises(WeightsError) as info:
        create_backbone(TINY_BACKBONE, weights=str(path))
    message = str(info.value)
    assert "missing (1): conv_stem.weight" in message
    assert "unexpected (1): extra.weight" in message
    assert "bn1.weight: file (3,)" in message


def test_unknown_weights_value_is_a_clear_error():
    with pytest.raises(ConfigError, match="'imagenet', 'none' or the path"):
        create_backbone(TINY_BACKBONE, weights="imagenet21k")
