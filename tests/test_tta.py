"""Test-time augmentation: the views, and that the feature cache, the network and the service agree on them."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

import headstart
from conftest import make_folder
from headstart.cli import main
from headstart.data.scan import collect_files
from headstart.data.transforms import Preprocessing, corner_crop, tta_views

PREP = Preprocessing(32, 36, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "bilinear")


def test_views_of_each_mode() -> None:
    assert tta_views("none", PREP) == (PREP, [("center", None)])
    flip, views = tta_views("flip", PREP)
    assert flip.mirror and views == [("center", None)] and flip.key() != PREP.key()  # a cache folder of its own
    same, views = tta_views("crops", PREP)
    assert same == PREP and [name for name, _ in views] == ["center", "crop-tl", "crop-tr", "crop-bl", "crop-br"]
    with pytest.raises(ValueError, match="none, flip, crops"):
        tta_views("rotate", PREP)


def test_corner_crops_take_the_corners() -> None:
    image = torch.arange(40 * 50, dtype=torch.int32).reshape(1, 40, 50).expand(3, 40, 50)
    tl, br = corner_crop("tl", 32)(image), corner_crop("br", 32)(image)
    assert tl.shape == br.shape == (3, 32, 32)
    assert tl[0, 0, 0] == 0 and br[0, -1, -1] == image[0, -1, -1]
    assert corner_crop("tr", 32)(image)[0, 0, -1] == 49 and corner_crop("bl", 32)(image)[0, -1, 0] == 39 * 50


@pytest.fixture(scope="module")
def extract_run(tmp_path_factory: pytest.TempPathFactory, tiny_weights: Path) -> Iterator[tuple[Path, Path, Path]]:
    """An extract model of tiny_cnn on stripes: (run folder, data, feature cache)."""
    root = tmp_path_factory.mktemp("tta")
    data = make_folder(root / "data", {"train": 8, "val": 4})
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HEADSTART_CACHE", str(root / "cache"))
        headstart.train(
            data, strategy="extract", backbone="tiny_cnn", weights=str(tiny_weights), out=str(root / "run"),
            precision="fp32", num_workers=0, **{"run.report": False, "run.audit": False},
        )  # fmt: skip
        yield root / "run", data, root / "cache"


@pytest.mark.parametrize("tta", ["flip", "crops"])
def test_cached_features_and_the_network_agree(tta: str, extract_run: tuple[Path, Path, Path]) -> None:
    run, data, cache = extract_run
    model = headstart.load(run)
    records = model._dataset(data).val
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HEADSTART_CACHE", str(cache))
        cached, _ = model.predict_proba(records, from_cache=True, tta=tta)
        again, _ = headstart.load(run).predict_proba(records, from_cache=True, tta=tta)  # from the cache now
        plain, _ = model.predict_proba(records, from_cache=True)
    computed, _ = model.predict_proba(records, tta=tta)  # new images: the network, no cache
    np.testing.assert_allclose(cached, computed, atol=1e-5)
    np.testing.assert_allclose(cached, again, atol=1e-6)
    assert not np.allclose(cached, plain, atol=1e-4)  # the views changed something
    views = {folder.name.rsplit("-", 1)[-1] for folder in (cache / "features").iterdir()}
    assert ("tr" in views) == (tta == "crops")  # the corner crops have cache folders of their own


def test_flip_is_mirror_invariant(extract_run: tuple[Path, Path, Path]) -> None:
    model = headstart.load(extract_run[0])
    prep, _ = tta_views("flip", model.preprocessing)
    x = torch.randn(3, 3, prep.input_size, prep.input_size)
    with torch.inference_mode():
        np.testing.assert_allclose(model.network(prep)(x), model.network(prep)(x.flip(-1)), atol=1e-5)
        assert not torch.allclose(model.network()(x), model.network()(x.flip(-1)), atol=1e-4)


def test_cli_evaluate_and_predict_with_tta(extract_run: tuple[Path, Path, Path], tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    run, data, cache = extract_run
    monkeypatch.setenv("HEADSTART_CACHE", str(cache))
    assert main(["evaluate", str(run), str(data), "--tta", "crops", "--json", str(tmp_path / "m.json")]) == 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["tta"] == "crops" and metrics["n"] == 8
    assert main(["predict", str(run), str(data / "val"), "--tta", "flip", "--output", str(tmp_path / "p.json")]) == 0
    assert len(json.loads((tmp_path / "p.json").read_text())) == 8
    with pytest.raises(SystemExit):
        main(["predict", str(run), str(data / "val"), "--tta", "rotate"])


def test_service_tta_matches_predict(extract_run: tuple[Path, Path, Path]) -> None:
    from headstart.serving.serve import create_app, serve_in_thread

    run, data, _ = extract_run
    files = collect_files([data / "val"])[:3]
    model = headstart.load(run)
    uploads = [("files", (f.name, f.read_bytes(), "image/jpeg")) for f in files]
    with serve_in_thread(create_app(run)) as url, httpx.Client(base_url=url, timeout=60) as client:
        for tta in ("none", "flip", "crops"):
            answer = client.post("/predict", params={"tta": tta, "top_k": 2}, files=uploads)
            assert answer.status_code == 200, answer.text
            served = [{t["label"]: t["probability"] for t in r["top"]} for r in answer.json()["results"]]
            probs, _ = model.predict_proba(files, tta=tta)
            expected = [dict(zip(model.classes, row, strict=True)) for row in probs.tolist()]
            for got, want in zip(served, expected, strict=True):
                assert got == pytest.approx(want, abs=1e-5)
        bad = client.post("/predict", params={"tta": "rotate"}, files=uploads)
        assert bad.status_code == 422


def test_crops_as_training_features(tmp_path: Path, tiny_weights: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--crops: the head trains on crop-averaged features, the model predicts with them by default, and the run's
    own validation metrics are those predictions' (a linear head on the mean features = the mean of the logits)."""
    from headstart.serving.serve import create_app, serve_in_thread

    data = make_folder(tmp_path / "data", {"train": 8, "val": 4})
    monkeypatch.setenv("HEADSTART_CACHE", str(tmp_path / "cache"))
    common = {"strategy": "extract", "backbone": "tiny_cnn", "weights": str(tiny_weights), "precision": "fp32",
              "num_workers": 0, "run.report": False, "run.audit": False}  # fmt: skip
    result = headstart.train(data, crops=True, out=str(tmp_path / "run"), **common)
    assert "four corner crops" in result.history[0]["recipe"]
    views = {folder.name.rsplit("-", 2)[-1] for folder in (tmp_path / "cache" / "features").iterdir()}
    assert {"center", "tl", "tr", "bl", "br"} <= views  # training filled the cache folders predictions read
    model = headstart.load(tmp_path / "run")
    assert model.preprocessing.crops and len(tta_views(None, model.preprocessing)[1]) == 5
    own = model.evaluate(data)
    assert own["tta"] == "crops" and own["accuracy"] == pytest.approx(result.metrics["accuracy"])
    files = collect_files([data / "val"])
    default, _ = model.predict_proba(files)  # through the network, no cache
    crops, _ = model.predict_proba(files, tta="crops")
    centre, _ = model.predict_proba(files, tta="none")
    np.testing.assert_allclose(default, crops, atol=1e-6)
    assert not np.allclose(default, centre, atol=1e-4)
    cached, _ = model.predict_proba(model._dataset(data).val, from_cache=True)
    np.testing.assert_allclose(np.sort(cached, axis=0), np.sort(default, axis=0), atol=1e-4)
    uploads = [("files", (f.name, f.read_bytes(), "image/jpeg")) for f in files[:2]]
    with serve_in_thread(create_app(tmp_path / "run")) as url, httpx.Client(base_url=url, timeout=60) as client:
        served = client.post("/predict", params={"top_k": 2}, files=uploads).json()["results"]
    for row, want in zip(served, default[:2], strict=True):
        assert {t["label"]: t["probability"] for t in row["top"]} == pytest.approx(
            dict(zip(model.classes, want.tolist(), strict=True)), abs=1e-5
        )
    plain = headstart.train(data, out=str(tmp_path / "plain"), **common)
    assert plain.metrics["accuracy"] >= 0 and not headstart.load(tmp_path / "plain").preprocessing.crops
    with pytest.raises(ValueError, match="--tta crops"):
        headstart.train(data, crops=True, out=str(tmp_path / "ft"), **{**common, "strategy": "finetune"})
