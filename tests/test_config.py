import pytest

from bonefrac.config import Config, load_config, to_dict
from bonefrac.errors import ConfigError


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
])
def test_bad_config_fails_clearly(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


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
