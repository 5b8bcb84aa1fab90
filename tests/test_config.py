"""Run configuration: YAML round trip, strict keys and types, dotted replace, validated choices."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from headstart.config import (
    DataConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    TrainConfig,
    from_dict,
    load_yaml,
    replace,
    save_yaml,
    to_dict,
)


def _custom() -> TrainConfig:
    return TrainConfig(
        strategy="extract",
        data=DataConfig(path="data/ants", val_fraction=0.3, batch_size=8, num_workers=0),
        model=ModelConfig(backbone="tiny_cnn", weights="w.safetensors", input_size=96),
        optim=OptimConfig(epochs=2, lr=1e-3, augment="strong", head_c=0.5),
        run=RunConfig(out="runs/x", seed=7, precision="fp32", class_weights="auto", early_stopping=3),
    )


def test_yaml_round_trip(tmp_path: Path) -> None:
    for config in (TrainConfig(), _custom()):
        path = tmp_path / "config.yaml"
        save_yaml(config, path)
        assert load_yaml(TrainConfig, path) == config
    written = yaml.safe_load(path.read_text())
    assert written["model"]["weights"] == "w.safetensors" and written["optim"]["lr"] == 1e-3
    assert written["optim"]["weight_decay"] is None  # unresolved fields stay visible as null


def test_partial_yaml_keeps_defaults(tmp_path: Path) -> None:
    path = tmp_path / "small.yaml"
    path.write_text("strategy: scratch\noptim:\n  epochs: 3\n  lr: 1\nmodel: {}\n")
    config = load_yaml(TrainConfig, path)
    assert config.strategy == "scratch" and config.optim.epochs == 3
    assert config.optim.lr == 1.0 and isinstance(config.optim.lr, float)  # an int is fine where a float goes
    assert config.model == ModelConfig() and config.data == DataConfig()
    (tmp_path / "empty.yaml").write_text("")
    assert load_yaml(TrainConfig, tmp_path / "empty.yaml") == TrainConfig()


def test_unknown_keys_list_the_valid_ones(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['stratgy'\] in config; valid keys: strategy, data, "):
        from_dict(TrainConfig, {"stratgy": "extract"})
    with pytest.raises(ValueError, match=r"\['learning_rate'\] in config\.optim; valid keys: epochs, lr, ") as info:
        from_dict(TrainConfig, {"optim": {"learning_rate": 0.1}})
    assert "bn_policy" in str(info.value)
    path = tmp_path / "typo.yaml"
    path.write_text("run:\n  sead: 3\n")
    with pytest.raises(ValueError, match=rf"\['sead'\] in {path}\.run; valid keys: out, overwrite, seed"):
        load_yaml(TrainConfig, path)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"optim": {"epochs": "five"}}, r"config\.optim\.epochs must be int, NoneType, got 'five'"),
        ({"optim": {"epochs": 2.5}}, r"config\.optim\.epochs must be int"),
        ({"data": {"batch_size": True}}, r"config\.data\.batch_size must be int, got True"),
        ({"run": {"overwrite": "yes"}}, r"config\.run\.overwrite must be bool"),
        ({"data": {"val_fraction": "0.2"}}, r"config\.data\.val_fraction must be float"),
        ({"strategy": None}, r"config\.strategy may not be empty"),
        ({"model": "tiny_cnn"}, r"config\.model must be a mapping, got str"),
        ({"model": {"backbone": 3}}, r"config\.model\.backbone must be str, NoneType, got 3"),
    ],
)
def test_wrong_types_are_rejected(values: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        from_dict(TrainConfig, values)


def test_optional_fields_accept_null() -> None:
    config = from_dict(TrainConfig, {"model": {"weights": None, "input_size": None}, "optim": {"lr": None}})
    assert config.model.weights is None and config.optim.lr is None


def test_replace_with_dotted_keys() -> None:
    base = _custom()
    changed = replace(base, strategy="finetune", **{"optim.lr": 0.01, "optim.epochs": 9, "run.seed": 1})
    assert changed.strategy == "finetune"
    assert (changed.optim.lr, changed.optim.epochs, changed.run.seed) == (0.01, 9, 1)
    assert changed.optim.augment == "strong" and changed.run.precision == "fp32"  # untouched fields kept
    assert changed.data == base.data and base.optim.lr == 1e-3  # the original is unchanged (frozen)
    with pytest.raises(
        ValueError, match=r"unknown key\(s\) \['learning_rate'\] in OptimConfig; valid keys: epochs, lr"
    ):
        replace(base, **{"optim.learning_rate": 1.0})
    with pytest.raises(dataclasses.FrozenInstanceError):
        base.strategy = "scratch"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"strategy": "transfer"}, r"unknown strategy 'transfer'; choose one of auto, extract, finetune, scratch"),
        ({"run.precision": "fp16"}, r"unknown precision 'fp16'; choose auto, bf16 or fp32"),
        ({"run.class_weights": "balanced"}, r"unknown class_weights 'balanced'"),
        ({"data.val_fraction": 1.0}, r"val_fraction must lie strictly between 0 and 1, got 1.0"),
    ],
)
def test_invalid_choices_are_rejected(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        replace(TrainConfig(), **changes)
    nested: dict[str, object] = {}
    for key, value in changes.items():
        head, _, rest = key.partition(".")
        nested[head] = {rest: value} if rest else value
    with pytest.raises(ValueError, match=message):
        from_dict(TrainConfig, nested)


def test_to_dict_is_plain() -> None:
    values = to_dict(_custom())
    assert values["data"]["path"] == "data/ants" and values["run"]["class_weights"] == "auto"
    assert yaml.safe_load(yaml.safe_dump(values)) == values
    assert from_dict(TrainConfig, values) == _custom()
