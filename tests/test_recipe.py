"""The auto recipe's parts: backbone ensembles, mirrored feature views, the head's scaling chosen by CV, and what a
run records about its choices."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

import headstart
from headstart.config import ModelConfig
from headstart.data.transforms import Preprocessing
from headstart.errors import BackboneError
from headstart.models.backbones import create_backbone
from headstart.models.classifier import load_classifier
from headstart.models.heads import fit_logistic, predict_proba
from headstart.training.strategies import BACKBONES, resolve_model

PAIR = "test_resnet+test_convnext"  # two tiny random timm networks with the same normalisation


def test_ensemble_concatenates_members_each_at_its_own_size() -> None:
    torch.manual_seed(0)
    ensemble = create_backbone(PAIR, pretrained=False).eval()
    a, b = (create_backbone(name, pretrained=False).eval() for name in PAIR.split("+"))
    a.load_state_dict({k.removeprefix("net.members.0."): v for k, v in ensemble.state_dict().items()
                       if k.startswith("net.members.0.")})  # fmt: skip
    b.load_state_dict({k.removeprefix("net.members.1."): v for k, v in ensemble.state_dict().items()
                       if k.startswith("net.members.1.")})  # fmt: skip
    x = torch.randn(2, 3, 160, 160)
    assert ensemble.num_features == a.num_features + b.num_features
    with torch.no_grad():
        expected = torch.cat([a(x), b(x)], 1)
        torch.testing.assert_close(ensemble(x), expected)
        # another input size reaches every member in the same proportion
        assert ensemble(torch.randn(1, 3, 128, 128)).shape == (1, ensemble.num_features)


def test_ensemble_rejects_bad_names() -> None:
    with pytest.raises(BackboneError, match="twice"):
        create_backbone("test_resnet+test_resnet", pretrained=False)
    with pytest.raises(BackboneError, match="different input normalisations"):
        create_backbone("test_resnet+test_efficientnet", pretrained=False)
    with pytest.raises(BackboneError, match="ensemble"):
        create_backbone(PAIR, pretrained=True, weights="some.safetensors")


def test_mirror_averages_the_mirrored_view() -> None:
    torch.manual_seed(0)
    backbone = create_backbone("test_resnet", pretrained=False).eval()
    x = torch.randn(3, 3, 160, 160)
    with torch.no_grad():
        plain, flipped = backbone(x), backbone(x.flip(-1))
        backbone.preprocessing = dataclasses.replace(backbone.preprocessing, mirror=True)
        torch.testing.assert_close(backbone(x), (plain + flipped) / 2, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(backbone(x), backbone(x.flip(-1)), rtol=1e-5, atol=1e-5)  # mirror-invariant


def test_preprocessing_key_and_files_unchanged_without_mirror() -> None:
    prep = Preprocessing(224, 256, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bilinear")
    before = {"input_size": 224, "resize_size": 256, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
              "interpolation": "bilinear"}  # fmt: skip
    # caches and models written before the field existed keep their keys and load
    assert prep.key() == hashlib.sha1(repr(sorted(before.items())).encode()).hexdigest()[:12]
    assert Preprocessing.from_dict(before) == prep
    mirrored = dataclasses.replace(prep, mirror=True)
    assert mirrored.key() != prep.key() and Preprocessing.from_dict(mirrored.to_dict()) == mirrored


def test_head_scaling_auto_is_chosen_by_cross_validation() -> None:
    rng = np.random.default_rng(0)
    n, d = 120, 40
    labels = np.arange(n) % 3
    signal = np.eye(3)[labels] @ rng.normal(size=(3, 4)) * 3.0
    # four informative dimensions with a large spread, and many noise dimensions with a tiny one: per-feature
    # standardisation blows the noise up to the signal's size, a global scale keeps it small
    features = np.concatenate([signal + rng.normal(size=(n, 4)), rng.normal(size=(n, d - 4)) * 0.01], 1)
    head, info = fit_logistic(features, labels, 3, scaling="auto")
    assert info["scaling"] in ("feature", "global") and 0.0 <= float(info["cv_accuracy"]) <= 1.0
    _, feature_info = fit_logistic(features, labels, 3, scaling="feature")
    _, global_info = fit_logistic(features, labels, 3, scaling="global")
    assert float(info["cv_accuracy"]) == max(float(feature_info["cv_accuracy"]), float(global_info["cv_accuracy"]))
    assert (predict_proba(head, features).argmax(1) == labels).mean() > 0.9
    with pytest.raises(ValueError, match="scaling"):
        fit_logistic(features, labels, 3, scaling="whitened")


def test_strategies_fill_backbone_and_mirror() -> None:
    assert resolve_model("auto", ModelConfig()).backbone == BACKBONES["auto"]
    assert resolve_model("auto", ModelConfig()).mirror is False  # measured no better on the suite (strategies.MIRROR)
    assert resolve_model("auto", ModelConfig(mirror=True)).mirror is True
    assert resolve_model("extract", ModelConfig()).mirror is False
    assert resolve_model("finetune", ModelConfig(backbone="resnet50")).backbone == "resnet50"
    with pytest.raises(ValueError, match="frozen features"):
        resolve_model("finetune", ModelConfig(mirror=True))


def test_auto_run_records_its_recipe_and_predicts_what_it_validated(
    image_folder: Path, tiny_weights: Path, tmp_path: Path
) -> None:
    result = headstart.train(
        image_folder, backbone="tiny_cnn", weights=str(tiny_weights), mirror=True, out=str(tmp_path / "run"),
        cache_dir=str(tmp_path / "cache"), precision="fp32", num_workers=0,
        **{"run.report": False, "run.audit": False},
    )  # fmt: skip
    info = json.loads((tmp_path / "run" / "model.json").read_text())
    assert info["strategy"] == "auto" and info["preprocessing"]["mirror"] is True
    recipe = info["recipe"]
    assert recipe.startswith("auto: frozen tiny_cnn features (64)") and "mirror image" in recipe
    assert "cross-validation on the training split" in recipe
    # the scaling CV chose, in words (it once read "feature feature scaling")
    assert ("per-feature scaling" in recipe) != ("one global scale" in recipe) and "feature feature" not in recipe
    assert "recipe" in result.history[0]
    # the saved model (mirror inside its forward) gives the validation metrics the head was chosen on
    metrics = headstart.load(tmp_path / "run").evaluate(image_folder)
    assert metrics["accuracy"] == pytest.approx(result.metrics["accuracy"], abs=1e-9)


def test_frozen_model_is_served_from_the_feature_cache(
    image_folder: Path, tiny_weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from headstart.insight import predictor

    monkeypatch.setenv("HEADSTART_CACHE", str(tmp_path / "cache"))
    result = headstart.train(
        image_folder, strategy="extract", backbone="tiny_cnn", weights=str(tiny_weights), out=str(tmp_path / "run"),
        precision="fp32", num_workers=0, **{"run.report": False, "run.audit": False},
    )  # fmt: skip
    built = []
    monkeypatch.setattr(predictor, "load_classifier", lambda run: built.append(run) or load_classifier(run))
    cached = headstart.load(tmp_path / "run").evaluate(image_folder)
    assert built == []  # every feature came from the cache: no network was built
    assert cached["accuracy"] == pytest.approx(result.metrics["accuracy"], abs=1e-9)
    monkeypatch.setenv("HEADSTART_CACHE", str(tmp_path / "empty"))
    model = headstart.load(tmp_path / "run")
    computed = model.evaluate(image_folder)
    assert len(built) == 1  # an empty cache: the model's own network ran
    np.testing.assert_allclose(computed["confusion_matrix"], cached["confusion_matrix"])
    probs, _ = model.predict_proba(sorted((image_folder / "val").rglob("*.jpg")))
    direct = torch.softmax(model.classifier(torch.zeros(1, 3, 64, 64)), 1)  # the network still answers directly
    assert probs.shape[1] == direct.shape[1] == 2


def test_a_class_of_one_training_image_trains_at_a_fixed_strength_and_says_so(
    folder_factory: Callable[..., Path], tiny_weights: Path, tmp_path: Path
) -> None:
    """No split keeps a one-image class on both sides of a fold, so C is fixed, and the recipe line says why."""
    data = folder_factory("one", {"train": 1, "val": 2})
    headstart.train(
        data, backbone="tiny_cnn", weights=str(tiny_weights), out=str(tmp_path / "run"),
        cache_dir=str(tmp_path / "cache"), precision="fp32", num_workers=0,
        **{"run.report": False, "run.audit": False},
    )  # fmt: skip
    info = json.loads((tmp_path / "run" / "model.json").read_text())
    assert "C=1.0" in info["recipe"] and "a class has a single training image" in info["recipe"]
    assert "chosen by cross-validation" not in info["recipe"]
    predictions, skipped = headstart.load(tmp_path / "run").predict(sorted((data / "val").rglob("*.jpg")))
    assert len(predictions) == 4 and not skipped
