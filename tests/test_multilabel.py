"""Multi-label classification: manifests of label sets, one-vs-rest heads with cross-validated thresholds, the BCE
objective, the metrics, and a trained model through predict, evaluate, the report, export and the service."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image, ImageFilter

import headstart
from headstart.cli import main
from headstart.data.scan import load_dataset
from headstart.errors import ConfigError, DataError, IntegrityError
from headstart.insight.metrics import average_precision, format_metrics, multilabel_metrics
from headstart.insight.predictor import write_predictions
from headstart.models.checks import HEAD_TENSORS, check_classifier_files, read_info, weight_shapes
from headstart.models.heads import choose_threshold, fit_one_vs_rest, predict_sigmoid

FAST = {"backbone": "tiny_cnn", "batch_size": 8, "num_workers": 0, "run.report": False}
COMBOS = (("striped",), ("red",), ("red", "striped"))


def picture(labels: tuple[str, ...], rng: np.random.Generator, size: tuple[int, int] = (48, 40)) -> Image.Image:
    """Two independent visible properties, one per label: vertical stripes ("striped") and a red cast ("red")."""
    w, h = size
    pixels = np.ones((h, w, 3)) * rng.integers(60, 120, 3)
    if "striped" in labels:
        pixels += ((np.arange(w) // int(rng.integers(3, 6))) % 2)[None, :, None] * 90
    if "red" in labels:
        pixels[..., 0] += 110
        pixels[..., 2] -= 40
    pixels += rng.normal(0, 6, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def make_manifest(root: Path, per_combo: dict[str, int], column: str = "labels", seed: int = 0) -> Path:
    """``root/data.csv`` (path,<column>,split) over synthetic pictures of every label combination in :data:`COMBOS`."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    rows = [["path", column, "split"]]
    for split, count in per_combo.items():
        for combo in COMBOS:
            for i in range(count):
                name = f"{split}_{'_'.join(combo)}_{i}.jpg"
                picture(combo, rng).save(root / name, quality=92)
                rows.append([name, "|".join(combo), split])
    with (root / "data.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    return root / "data.csv"


def write_rows(path: Path, rows: list[str]) -> Path:
    """A manifest whose every row points at one synthetic picture."""
    picture(("red",), np.random.default_rng(0)).save(path.parent / "a.jpg")
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_manifest(tmp_path_factory.mktemp("multilabel") / "data", {"train": 10, "val": 4})


@pytest.fixture(scope="module")
def run(manifest: Path, tiny_weights: Path, tmp_path_factory: pytest.TempPathFactory) -> headstart.TrainResult:
    """An extract run on the synthetic label sets, with its report."""
    folder = tmp_path_factory.mktemp("run")
    return headstart.train(manifest, strategy="extract", weights=str(tiny_weights), out=str(folder / "run"),
                           cache_dir=str(folder / "cache"), **{**FAST, "run.report": True})  # fmt: skip


# -- manifests ----------------------------------------------------------------------------------------------------


def test_labels_column_makes_a_multilabel_dataset(manifest: Path) -> None:
    dataset = load_dataset(manifest)
    assert dataset.multi_label and dataset.classes == ["red", "striped"]
    assert dataset.counts(dataset.train) == {"red": 20, "striped": 20}
    both = next(r for r in dataset.train if "red_striped" in r.path.name)
    assert both.labels == (0, 1) and both.label == 0
    targets = dataset.targets(dataset.val)
    assert targets.shape == (12, 2) and targets.sum() == 16  # 4 red, 4 striped, 4 both
    assert [tuple(row) for row in targets[[0, 4, 8]]] == [(0, 1), (1, 0), (1, 1)]


def test_label_column_is_split_only_with_multi_label(manifest: Path, tmp_path: Path) -> None:
    single = make_manifest(tmp_path / "single", {"train": 3}, column="label")
    assert load_dataset(single, multi_label=True).classes == ["red", "striped"]
    plain = load_dataset(single)  # without the flag a label set is one class of its own
    assert not plain.multi_label and plain.classes == ["red", "red|striped", "striped"]


def test_fingerprint_sees_label_sets(tmp_path: Path) -> None:
    one = make_manifest(tmp_path / "one", {"train": 3})
    text = one.read_text()
    first = load_dataset(one).fingerprint()
    one.write_text(text.replace("train_red_0.jpg,red,", "train_red_0.jpg,red|striped,"))
    assert load_dataset(one).fingerprint() != first


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (["path,labels", "a.jpg,red", "a.jpg,"], r"line 3: no label; .*fill it in, or remove the row"),
        (["path,labels", "a.jpg,red", "a.jpg,red||blue"], r"line 3: an empty label in 'red\|\|blue'"),
        (["path,labels,split", "a.jpg,red|blue,train", "a.jpg,green,val"],
         r"line 3: val row uses label\(s\) \['green'\] that no train row has.*add train rows"),
        (["path,labels,split", "a.jpg,red|blue,train", "a.jpg,red,train", "a.jpg,red|blue,val"],
         r"label\(s\) \['red'\] are on every usable training image.*add training images without them"),
    ],
)  # fmt: skip
def test_bad_manifests_name_the_line_and_the_fix(tmp_path: Path, rows: list[str], message: str) -> None:
    with pytest.raises(DataError, match=message):
        load_dataset(write_rows(tmp_path / "data.csv", rows))


def test_multi_label_needs_a_manifest(image_folder: Path) -> None:
    with pytest.raises(DataError, match="multi-label data is a CSV manifest"):
        load_dataset(image_folder, multi_label=True)


# -- heads and thresholds ---------------------------------------------------------------------------------------------


def test_threshold_maximises_f1_between_neighbours() -> None:
    probs = np.array([0.95, 0.8, 0.7, 0.4, 0.3, 0.1])
    assert choose_threshold(probs, np.array([1, 1, 0, 1, 0, 0])) == pytest.approx(0.35)  # F1 6/7 at 0.35, 0.8 at 0.75
    assert choose_threshold(probs, np.array([1, 1, 1, 0, 0, 0])) == pytest.approx(0.55)
    assert choose_threshold(probs, np.zeros(6)) == 0.5  # nothing to find: the neutral threshold


def test_one_vs_rest_matches_scikit_learn_per_label() -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 12))
    targets = np.stack([x[:, 0] + 0.5 * rng.normal(size=80) > 0, x[:, 1] - x[:, 2] > 0.3], 1).astype(np.float32)
    head, info, thresholds = fit_one_vs_rest(x, targets, c=0.3, names=["a", "b"])
    scaled = StandardScaler().fit_transform(x)
    for j in range(2):
        reference = LogisticRegression(C=0.3, tol=1e-10, max_iter=5000).fit(scaled, targets[:, j])
        got = predict_sigmoid(head, x.astype(np.float32))[:, j]
        np.testing.assert_allclose(got, reference.predict_proba(scaled)[:, 1], atol=2e-3)
    assert info["C"] == {"a": 0.3, "b": 0.3} and set(info["thresholds"]) == {"a", "b"}
    assert np.all((thresholds > 0) & (thresholds < 1))


def test_thresholds_come_from_out_of_fold_probabilities() -> None:
    # A label that only noise predicts: in-sample probabilities of a weakly regularised fit separate the training
    # rows, but out-of-fold ones do not, so its CV log-loss is poor and its threshold is not where in-sample F1 is.
    rng = np.random.default_rng(1)
    x = rng.normal(size=(60, 40))
    targets = np.stack([x[:, 0] > 0, rng.random(60) > 0.5], 1).astype(np.float32)
    head, info, thresholds = fit_one_vs_rest(x, targets, names=["signal", "noise"])
    probs = predict_sigmoid(head, x.astype(np.float32))
    assert info["cv_log_loss"] > 0
    assert multilabel_metrics(targets, probs, ["signal", "noise"], thresholds)["per_class"]["signal"]["f1"] > 0.9
    oof_free = choose_threshold(probs[:, 1], targets[:, 1])
    assert thresholds[1] != pytest.approx(oof_free)


def test_a_label_too_rare_for_cross_validation_gets_a_named_fallback() -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(30, 6))
    targets = np.zeros((30, 2), dtype=np.float32)
    targets[:, 0] = x[:, 0] > 0
    targets[3, 1] = 1  # one image with the rare label
    _, info, thresholds = fit_one_vs_rest(x, targets, names=["common", "rare"])
    assert "rare" in info["cv_skipped"] and "common" not in info["cv_skipped"]
    assert thresholds[1] == 0.5 and info["C"]["rare"] == 1.0


# -- metrics ----------------------------------------------------------------------------------------------------------


def test_metrics_match_scikit_learn() -> None:
    from sklearn.metrics import accuracy_score, average_precision_score, hamming_loss, precision_recall_fscore_support

    rng = np.random.default_rng(3)
    truth = (rng.random((40, 3)) > 0.6).astype(np.float32)
    probs = np.clip(truth * 0.4 + rng.random((40, 3)) * 0.6, 0, 1).round(2)  # ties, as real scores have
    thresholds = np.array([0.5, 0.4, 0.6])
    got = multilabel_metrics(truth, probs, ["a", "b", "c"], thresholds)
    preds = probs >= thresholds
    precision, recall, f1, support = precision_recall_fscore_support(truth, preds, zero_division=0)
    aps = [average_precision_score(truth[:, j], probs[:, j]) for j in range(3)]
    assert got["mAP"] == pytest.approx(np.mean(aps))
    assert got["exact_match"] == pytest.approx(accuracy_score(truth, preds))
    assert got["hamming_loss"] == pytest.approx(hamming_loss(truth, preds))
    assert got["macro_f1"] == pytest.approx(f1.mean())
    for j, name in enumerate("abc"):
        row = got["per_class"][name]
        assert (row["precision"], row["recall"], row["f1"], row["support"]) == pytest.approx(
            (precision[j], recall[j], f1[j], support[j])
        )
        assert row["ap"] == pytest.approx(aps[j]) and row["threshold"] == thresholds[j]


def test_metrics_by_hand() -> None:
    truth = np.array([[1, 0], [1, 1], [0, 1], [0, 0]])
    probs = np.array([[0.9, 0.2], [0.6, 0.7], [0.3, 0.4], [0.1, 0.6]])
    got = multilabel_metrics(truth, probs, ["x", "y"], [0.5, 0.5])
    # x: predicted {0, 1}, true {0, 1}: all right, AP 1. y: predicted {1, 3}, true {1, 2}: P 1/2, R 1/2;
    # ranked 0.7 (hit), 0.6 (miss), 0.4 (hit), 0.2: AP = 1/2 * 1 + 1/2 * 2/3 = 5/6.
    assert got["per_class"]["y"]["ap"] == pytest.approx(5 / 6) and average_precision([0, 1, 1], [0.2, 0.3, 0.3]) == 1
    assert got["mAP"] == pytest.approx((1 + 5 / 6) / 2)
    assert got["exact_match"] == pytest.approx(2 / 4)  # images 0 and 1
    assert got["hamming_loss"] == pytest.approx(2 / 8)
    assert got["per_class"]["y"]["f1"] == pytest.approx(0.5)
    assert "macro mAP 0.9167" in format_metrics(got)


# -- a trained model --------------------------------------------------------------------------------------------------


def test_extract_run_saves_thresholds_and_scores_well(run: headstart.TrainResult, manifest: Path) -> None:
    info = json.loads((run.run_dir / "model.json").read_text())
    assert info["multi_label"] is True and set(info["thresholds"]) == {"red", "striped"}
    assert info["thresholds"] == run.history[0]["thresholds"]  # the CV thresholds of the head, as used
    assert info["val_metrics"]["mAP"] >= 0.9 and info["val_metrics"]["exact_match"] >= 0.75
    assert "one-vs-rest logistic heads" in info["recipe"] and "out-of-fold" in info["recipe"]
    model = headstart.load(run.run_dir)
    assert model.multi_label
    again = model.evaluate(manifest)
    assert again["mAP"] == pytest.approx(run.metrics["mAP"]) and again["exact_match"] == run.metrics["exact_match"]
    flipped = model.evaluate(manifest, tta="flip")  # logits averaged over the views, then the sigmoid
    assert flipped["tta"] == "flip" and flipped["mAP"] >= 0.9
    report = (run.run_dir / "report.html").read_text()
    assert "Per-label average precision" in report and "Confusion matrix" not in report
    assert "macro mAP" in model._repr_html_() and "macro mAP" in run._repr_html_()


def test_predict_gives_label_sets_and_every_probability(run: headstart.TrainResult, manifest: Path,
                                                        tmp_path: Path) -> None:  # fmt: skip
    files = sorted(manifest.parent.glob("val_*.jpg"))
    rows, failed = headstart.load(run.run_dir).predict(files, top_k=2)
    assert not failed and len(rows) == 12
    right = sum(set(r.labels or []) == set(r.path.stem.split("_")[1:-1]) for r in rows)
    assert right >= 9
    for r in rows:
        assert r.probabilities is not None and set(r.probabilities) == {"red", "striped"}
        assert r.label == "|".join(r.labels or [])
    write_predictions(rows, tmp_path / "p.csv")
    with (tmp_path / "p.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert list(table[0]) == ["path", "labels", "red", "striped"] and table[0]["labels"] == rows[0].label
    write_predictions(rows, tmp_path / "p.json")
    assert json.loads((tmp_path / "p.json").read_text())[0]["probabilities"] == pytest.approx(rows[0].probabilities)


def test_cli_multi_label_flag_train_evaluate_predict(manifest: Path, tiny_weights: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    single = manifest.parent / "single.csv"
    single.write_text(manifest.read_text().replace("path,labels,split", "path,label,split"))
    out = tmp_path / "run"
    assert main(["train", str(single), "--multi-label", "--strategy", "extract", "--backbone", "tiny_cnn",
                 "--weights", str(tiny_weights), "--out", str(out), "--cache-dir", str(tmp_path / "cache"),
                 "--batch-size", "8", "--no-report"]) == 0  # fmt: skip
    assert "val macro mAP" in capsys.readouterr().out
    assert json.loads((out / "model.json").read_text())["multi_label"] is True
    assert main(["evaluate", str(out), str(single), "--json", str(tmp_path / "m.json")]) == 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["multi_label"] and metrics["per_class"]["red"]["threshold"] > 0
    capsys.readouterr()
    assert main(["predict", str(out), str(manifest.parent / "val_red_striped_0.jpg")]) == 0
    assert capsys.readouterr().out.split("\t")[1] == "red|striped"


@pytest.mark.parametrize("strategy", ["finetune", "scratch"])
def test_network_strategies_train_with_bce(strategy: str, manifest: Path, tiny_weights: Path, tmp_path: Path) -> None:
    weights = {"weights": str(tiny_weights)} if strategy == "finetune" else {}
    result = headstart.train(manifest, strategy=strategy, epochs=2, out=str(tmp_path / "run"),
                             cache_dir=str(tmp_path / "cache"), **weights, **FAST)  # fmt: skip
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all("mAP" in row for row in rows) and rows[-1]["epoch"] == 2 and "train_exact_match" in rows[-1]
    assert (rows[0]["phase"] == "head") == (strategy == "finetune")  # finetune's epoch 0: the CV head
    info = json.loads((tmp_path / "run" / "model.json").read_text())
    assert info["multi_label"] and set(info["thresholds"]) == {"red", "striped"}
    assert info["val_metrics"]["mAP"] == pytest.approx(result.metrics["mAP"])
    assert headstart.load(tmp_path / "run").evaluate(manifest)["mAP"] == pytest.approx(result.metrics["mAP"])


def test_knn_head_is_refused(manifest: Path, tiny_weights: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="drop --head knn"):
        headstart.train(manifest, strategy="extract", head="knn", weights=str(tiny_weights), out=str(tmp_path / "r"),
                        cache_dir=str(tmp_path / "cache"), **FAST)  # fmt: skip


def test_single_label_model_refuses_multilabel_data(image_folder: Path, manifest: Path, tiny_weights: Path,
                                                    tmp_path: Path) -> None:  # fmt: skip
    out = tmp_path / "single"
    headstart.train(image_folder, strategy="extract", weights=str(tiny_weights), out=str(out),
                    cache_dir=str(tmp_path / "cache"), **FAST)  # fmt: skip
    model = headstart.load(out)
    assert not model.multi_label  # a model.json without the key is single-label, as before
    with pytest.raises(DataError, match="single-label model"):
        model.evaluate(load_dataset(manifest))


def test_thresholds_must_cover_exactly_the_labels(run: headstart.TrainResult) -> None:
    folder = run.run_dir
    info = read_info(folder)
    shapes = weight_shapes(folder, HEAD_TENSORS["linear"])
    check_classifier_files(info, shapes, folder)
    cases = [
        ({"red": 0.4}, r"no threshold in \[0, 1\] for label\(s\) striped"),
        ({**info["thresholds"], "blue": 0.5}, r"thresholds for label\(s\) blue that the model does not predict"),
        ({"red": 0.4, "striped": 1.5}, r"label\(s\) striped"),
        (None, "without per-label thresholds"),
    ]
    for thresholds, message in cases:
        with pytest.raises(IntegrityError, match=message):
            check_classifier_files({**info, "thresholds": thresholds}, shapes, folder)


def test_onnx_export_carries_thresholds_and_agrees(run: headstart.TrainResult, manifest: Path) -> None:
    from headstart.serving.export import export, read_metadata

    path = export(run.run_dir, "onnx", run.run_dir / "ml.onnx")
    meta = read_metadata(path)
    assert meta["multi_label"] is True and meta["thresholds"] == run.history[0]["thresholds"]
    assert meta["output"]["activation"] == "sigmoid"
    files = sorted(manifest.parent.glob("val_*.jpg"))
    torch_rows, _ = headstart.load(run.run_dir).predict(files)
    onnx_rows, _ = headstart.load(path).predict(files)
    assert [r.labels for r in onnx_rows] == [r.labels for r in torch_rows]
    for a, b in zip(onnx_rows, torch_rows, strict=True):
        assert a.probabilities == pytest.approx(b.probabilities, abs=2e-2)  # bf16 in PyTorch where the CPU has it
    with pytest.raises(ValueError, match=r"multi-label model.*export it without --quantize"):
        export(run.run_dir, "onnx", run.run_dir / "q.onnx", quantize="int8")


@pytest.fixture
def served(run: headstart.TrainResult) -> Iterator[str]:
    from headstart.serving.serve import create_app, serve_in_thread

    with serve_in_thread(create_app(run.run_dir)) as url:
        yield url


def test_service_returns_label_sets(served: str, run: headstart.TrainResult, manifest: Path) -> None:
    path = manifest.parent / "val_red_striped_1.jpg"
    with httpx.Client(base_url=served, timeout=30) as client:
        assert client.get("/health").json()["multi_label"] is True
        response = client.post("/predict", files={"files": (path.name, path.read_bytes(), "image/jpeg")})
    assert response.status_code == 200
    (result,) = response.json()["results"]
    (expected,), _ = headstart.load(run.run_dir).predict(path)
    assert result["labels"] == expected.labels and result["label"] == expected.label
    assert result["probabilities"] == pytest.approx(expected.probabilities, abs=1e-2)


# -- real photos ------------------------------------------------------------------------------------------------------


def composites(source: Path, out: Path, per_group: int, seed: int) -> None:
    """Square canvases of two halves in ``out``, listed in ``out/data.csv``: an ant photo beside a bee photo
    (``ants|bees``, sides drawn at random), or one photo beside a heavily blurred photo of either kind (``ants`` or
    ``bees``), so that the layout never tells which insect is there. Photos of ``source/train`` go to the train
    rows, those of ``source/val`` to the val rows."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    rows = [["path", "labels", "split"]]
    for split in ("train", "val"):
        photos = {k: sorted(p for p in (source / split / k).glob("*.jpg")) for k in ("ants", "bees")}
        for k in photos:
            photos[k] = [photos[k][i] for i in rng.permutation(len(photos[k]))]
        turn = {"ants": 0, "bees": 0}
        take = _taker(photos, turn)
        for group in ("ants", "bees", "ants|bees"):
            for i in range(per_group):
                if group == "ants|bees":
                    halves = [take("ants"), take("bees")]
                else:
                    halves = [take(group), take(str(rng.choice(["ants", "bees"]))).filter(ImageFilter.GaussianBlur(24))]
                if rng.random() < 0.5:
                    halves.reverse()
                canvas = Image.new("RGB", (448, 448), (128, 128, 128))
                canvas.paste(halves[0], (0, 112))
                canvas.paste(halves[1], (224, 112))
                name = f"{split}_{group.replace('|', '_')}_{i:03d}.jpg"
                canvas.save(out / name, quality=90)
                rows.append([name, group, split])
    with (out / "data.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)


def _taker(photos: dict[str, list[Path]], turn: dict[str, int]) -> Callable[[str], Image.Image]:
    """The next photo of a kind (cycling through them), 224 x 224."""

    def take(kind: str) -> Image.Image:
        path = photos[kind][turn[kind] % len(photos[kind])]
        turn[kind] += 1
        return Image.open(path).convert("RGB").resize((224, 224))

    return take


@pytest.mark.slow
def test_real_composites_of_ants_and_bees(hymenoptera: Path, tmp_path: Path) -> None:
    composites(hymenoptera, tmp_path / "data", per_group=24, seed=0)
    result = headstart.train(tmp_path / "data" / "data.csv", strategy="extract", backbone="efficientnet_lite0",
                             out=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"),
                             **{"run.report": False})  # fmt: skip
    metrics = result.metrics
    # Chance: mAP about the label frequency (2/3 of the images carry each label), exact match 1/3 for "always both".
    assert metrics["n"] == 72 and metrics["mAP"] >= 0.85 and metrics["exact_match"] >= 0.6
    assert min(row["f1"] for row in metrics["per_class"].values()) >= 0.75
    rows, _ = headstart.load(tmp_path / "run").predict(sorted((tmp_path / "data").glob("val_ants_bees_*.jpg")))
    assert sum(r.labels == ["ants", "bees"] for r in rows) >= 16  # of 24 pictures with both insects


def test_compare_refuses_multilabel_data_before_training(manifest: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="compare the macro mAP"):
        headstart.compare(manifest, out=tmp_path / "cmp")
    assert not (tmp_path / "cmp").exists()


def test_curve_and_suggest_refuse_multilabel(manifest: Path, run: headstart.TrainResult, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="multi-label"):
        headstart.learning_curve(manifest, out=tmp_path / "curve")
    assert not (tmp_path / "curve").exists()
    with pytest.raises(ConfigError, match="multi-label model"):
        headstart.suggest(run.run_dir, manifest.parent, budget=2, out=tmp_path / "suggest")
