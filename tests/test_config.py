import re

import pytest

from bonefrac.config import Config, load_config, to_dict
from bonefrac.errors import ConfigError
from bonefrac.metrics import SELECTION_METRICS


def test_defaults_and_overrides(tmp_path):
    f = tmp_path / "exp.yaml"
    f.write_text("model:\n  arch: resnet18\ntrain:\n  epochs: 4\naugment:\n  scale: [0.8, 1.2]\n")
    cfg = load_config(f, ["train.epochs=7", "optim.lr=1e-3", "data.cache_dir=null"])
    assert cfg.model.arch == "resnet18"
    assert cfg.train.epochs == 7  # the override wins over the file
    assert cfg.optim.lr == pytest.approx(1e-3)
    assert cfg.augment.scale == (0.8, 1.2)
    assert cfg.data.cache_dir is None
    assert to_dict(cfg)["train"]["epochs"] == 7


def test_config_is_frozen():
    cfg = Config()
    with pytest.raises(Exception):
        cfg.train.epochs = 3


@pytest.mark.parametrize("overrides, match", [
    (["train.epoch=3"], "unknown config key.*epoch"),
    (["nosuch.key=1"], "unknown config key.*nosuch"),
    (["train.epochs=three"], "train.epochs.*int"),
    (["train.amp=1"], "true/false"),
    (["augment.scale=0.9"], "list of 2"),
    (["epochs=3"], "section.key"),
    (["train.epochs"], "section.key=value"),
    (["data.sampler=balanced", "train.class_weights=true"], "both correct class imbalance"),
])
def test_bad_config_fails_clearly(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_the_compile_switch_takes_booleans_too(tmp_path):
    assert load_config(None, ["train.compile=false"]).train.compile == "off"
    assert load_config(None, ["train.compile=true"]).train.compile == "on"
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  compile: no\n")  # YAML 1.1 reads an unquoted no as false
    assert load_config(f).train.compile == "off"
    with pytest.raises(ConfigError, match="needs a word.*quote it"):  # other string keys still refuse booleans
        load_config(None, ["optim.schedule=true"])


def test_unknown_key_in_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("train:\n  epochs: 2\n  lerning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="lerning_rate"):
        load_config(f)


def test_missing_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_shipped_configs_load():
    from pathlib import Path

    for f in sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")):
        load_config(f)


@pytest.mark.parametrize("text", ["- train\n- data\n", "42\n", "[]\n"])
def test_top_level_must_be_a_mapping(tmp_path, text):
    # A list or scalar at the top used to crash with AttributeError ('list' object has no attribute 'items').
    f = tmp_path / "listy.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=r"listy\.yaml.*mapping of sections"):
        load_config(f)


def test_empty_section_counts_as_empty(tmp_path):
    # YAML reads a bare `train:` as None; an override into it used to say "'train' is not a config section".
    f = tmp_path / "empty.yaml"
    f.write_text("data:\ntrain:\n")
    assert load_config(f, ["train.epochs=1"]).train.epochs == 1
    assert load_config(f) == Config()


# (key, a value outside the range, the nearest allowed value, the range as the error states it)
RANGE_CASES = [
    ("model.in_chans", "2", "1", "one of 1, 3"),
    ("model.drop_rate", "1", "0.99", "in [0, 1)"),
    ("model.drop_path_rate", "-0.1", "0", "in [0, 1)"),
    ("model.std", "0", "null", "null or > 0"),
    ("data.size", "0", "1", ">= 1"),
    ("data.size", "-5", "1", ">= 1"),
    ("data.cache_margin", "0.9", "1", ">= 1"),
    ("data.batch_size", "0", "1", ">= 1"),
    ("data.decode_workers", "-1", "0", ">= 0"),
    ("data.device_cache_gib", "-1", "0", ">= 0"),
    ("augment.hflip_p", "1.5", "1", "in [0, 1]"),
    ("augment.vflip_p", "-0.1", "0", "in [0, 1]"),
    ("augment.blur_p", "2", "1", "in [0, 1]"),
    ("augment.brightness", "1.5", "1", "in [0, 1]"),
    ("augment.contrast", "-0.2", "0", "in [0, 1]"),
    ("augment.scale", "[0, 1]", "[0.5, 0.5]", "0 < low <= high"),
    ("augment.scale", "[1.2, 0.8]", "[0.8, 1.2]", "0 < low <= high"),
    ("optim.lr", "0", "1e-9", "> 0"),
    ("optim.weight_decay", "-0.01", "0", ">= 0"),
    ("optim.lr_base_batch", "0", "null", "null or >= 1"),
    ("optim.warmup_epochs", "-1", "0", ">= 0"),
    ("optim.min_lr_ratio", "1.5", "1", "in [0, 1]"),
    ("optim.plateau_factor", "1", "0.5", "in (0, 1)"),
    ("optim.plateau_patience", "-1", "0", ">= 0"),
    ("optim.grad_clip", "0", "null", "null or > 0"),
    ("train.epochs", "0", "1", ">= 1"),
    ("train.patience", "-1", "0", ">= 0"),  # 0 is documented: no early stopping
    ("train.label_smoothing", "1", "0", "in [0, 1)"),
    ("train.ema_decay", "1", "0", "in [0, 1)"),  # 0 is documented: no EMA
    ("train.watchdog_s", "-1", "0", ">= 0"),  # 0 is documented: no watchdog (the CLI tests use it)
    ("train.eval_batch_size", "0", "1", ">= 1"),
    ("train.max_steps_per_epoch", "0", "null", "null or >= 1"),
    ("train.box_loss", "-1", "0", ">= 0"),  # 0 is documented: no box loss
    ("train.seed", "-1", "0", "from 0 to 2**32 - 1"),  # numpy's range: -1 crashed when training started
    ("train.seed", "4294967296", "4294967295", "from 0 to 2**32 - 1"),
]


@pytest.mark.parametrize("key, bad, good, allowed", RANGE_CASES)
def test_out_of_range_values_fail_at_load(key, bad, good, allowed):
    # These used to load and fail later (ZeroDivisionError, ValueError) or silently misbehave (no checkpoint,
    # stopping after one epoch); the error must name the key, the value and the range. The boundary still loads.
    load_config(None, [f"{key}={good}"])
    with pytest.raises(ConfigError) as info:
        load_config(None, [f"{key}={bad}"])
    message = str(info.value)
    assert f"'{key}'" in message and allowed in message
    assert all(number in message for number in re.findall(r"-?[\d.]+", bad))  # the offending value is shown


ENUM_CASES = [
    ("optim.name", "sgd", "adam", ["adamw", "adam"]),
    ("optim.schedule", "step", "plateau", ["cosine", "plateau", "constant"]),
    ("data.sampler", "weighted", "balanced", ["shuffle", "balanced"]),
    ("train.compile", "always", "off", ["auto", "on", "off"]),
    ("train.compile_mode", "fast", "max-autotune", ["default", "reduce-overhead", "max-autotune"]),
    ("train.grad_sync", "nccl", "ddp", ["auto", "ddp", "allreduce"]),
    ("train.monitor", "f1", "balanced_accuracy", ["auto", *SELECTION_METRICS]),
]


@pytest.mark.parametrize("key, bad, good, choices", ENUM_CASES)
def test_unknown_choice_fails_at_load(key, bad, good, choices):
    # Checked elsewhere only once training starts (after the image cache is built); here at load, listing choices.
    load_config(None, [f"{key}={good}"])
    with pytest.raises(ConfigError, match=rf"'{key}'.*'{bad}'") as info:
        load_config(None, [f"{key}={bad}"])
    assert all(f"'{c}'" in str(info.value) for c in choices)


@pytest.mark.parametrize("override, match", [
    ("train.epochs=[1", r"override 'train.epochs=\[1': the value is not valid YAML"),
    ("data.size=!!python/object:os.system x", "the value is not valid YAML"),
    ("optim.lr=inf", "optim.lr' needs a finite number"),
    ("optim.lr=.nan", "optim.lr' needs a finite number"),
    ("augment.rotate_deg=.inf", "augment.rotate_deg' needs a finite number"),
    ("model.in_chans=4", "model.in_chans"),
])
def test_malformed_or_non_finite_overrides_fail_clearly(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_non_string_keys_and_yaml_errors_are_one_clear_line(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  1: 2\n")
    with pytest.raises(ConfigError, match="unknown config key.*: 1;"):
        load_config(cfg)
    cfg.write_text("train:\n  epochs: [1\n")
    with pytest.raises(ConfigError) as err:
        load_config(cfg)
    assert "not valid YAML at line" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("text, key, lines", [
    ("train:\n  epochs: 50\nmodel:\n  arch: resnet18\ntrain:\n  seed: 7\n", "train", "lines 1 and 5"),
    ("train:\n  epochs: 50\n  epochs: 5\n", "epochs", "lines 2 and 3"),
])
def test_a_key_given_twice_in_the_yaml_is_an_error_not_the_last_one_silently(tmp_path, text, key, lines):
    f = tmp_path / "dup.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=f"dup.yaml: key '{key}' is given twice \\({lines}\\)"):
        load_config(f)


def test_yaml_anchors_and_merge_keys_are_not_duplicates(tmp_path):
    f = tmp_path / "merge.yaml"
    f.write_text("train:\n  <<: {epochs: 3}\n  seed: 7\n")
    cfg = load_config(f)
    assert cfg.train.epochs == 3 and cfg.train.seed == 7


@pytest.mark.parametrize("key, value", [("augment.shear_deg", 90), ("augment.shear_deg", -5),
                                        ("augment.rotate_deg", 200), ("augment.translate", 1.5)])
def test_augmentation_ranges_that_would_break_the_views_are_refused(key, value):
    """shear 90 degrees made tan() infinite and every augmented view NaN, discovered only in training."""
    with pytest.raises(ConfigError, match=f"config key '{key}' must be"):
        load_config(None, [f"{key}={value}"])
