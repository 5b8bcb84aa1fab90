"""The small-data assistant: the learning curve (fit, fractions, projection) and the labelling suggestions."""

from __future__ import annotations

import csv
import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import headstart
from headstart.cli import main
from headstart.data.scan import Dataset, load_dataset
from headstart.errors import BackboneError, ConfigError, DataError
from headstart.insight.suggest import rank_pool, rank_typical, uncertainty
from headstart.models.heads import fit_logistic, predict_proba
from headstart.training.curve import curve_from_features, fit_power_law, nested_fractions

FAST = {"backbone": "tiny_cnn", "batch_size": 8, "num_workers": 0}


def test_power_law_fit_recovers_known_parameters() -> None:
    rng = np.random.default_rng(0)
    n = np.repeat([20, 40, 80, 160, 320], 4).astype(float)
    err = 0.05 + 0.20 * (n / 320) ** -0.6 + rng.normal(0, 0.002, len(n))
    fit = fit_power_law(n, err)
    assert fit.a == pytest.approx(0.05, abs=0.015)
    assert fit.b == pytest.approx(0.20, abs=0.02)
    assert fit.c == pytest.approx(0.6, abs=0.1)
    assert float(fit.error(3200)) == pytest.approx(0.05 + 0.20 * 10**-0.6, abs=0.01)
    with pytest.raises(ValueError, match="three training-set sizes"):
        fit_power_law(np.array([10.0, 20.0, 20.0]), np.array([0.3, 0.2, 0.2]))


def test_fractions_are_nested_and_stratified() -> None:
    labels = np.array([0] * 60 + [1] * 20 + [2] * 5)
    rows = nested_fractions(labels, [0.1, 0.25, 0.5, 1.0], seed=3)
    for small, big in itertools.pairwise(rows):
        assert set(small) <= set(big)  # nested
    for r in rows:
        counts = np.bincount(labels[r], minlength=3)
        assert counts.min() >= 2  # every class keeps two images, however small the fraction
    assert np.bincount(labels[rows[2]]).tolist() == [30, 10, 2]  # each class its share (2.5 rounds to 2)
    assert len(rows[-1]) == len(labels)
    assert not np.array_equal(rows[0], nested_fractions(labels, [0.1], seed=4)[0])  # seeds draw differently


def _blobs(n_per_class: int, seed: int, classes: int = 3, dim: int = 16) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).normal(0, 1.0, (classes, dim))
    y = np.repeat(np.arange(classes), n_per_class)
    return centres[y] + rng.normal(0, 1.6, (len(y), dim)), y


def _fixed_head(x: np.ndarray, y: np.ndarray, k: int, seed: int):  # type: ignore[no-untyped-def]
    head, _ = fit_logistic(x, y, k, c=0.1, seed=seed)
    return lambda f: predict_proba(head, f)


def test_curve_projects_a_sane_gain_with_an_interval() -> None:
    x, y = _blobs(40, 0)
    vx, vy = _blobs(100, 1)
    result = curve_from_features(x, y, vx, vy, ["a", "b", "c"], head=_fixed_head, seeds=3, boot=60)
    means = np.mean(result.accuracy, axis=0)
    assert means[-1] > means[0]  # more images, better: the synthetic task is learnable
    assert result.sizes[0] == 12 and result.sizes[-1] == 120  # a tenth of each class, then all
    accs = [p.accuracy for p in result.projections]
    assert [p.multiplier for p in result.projections] == [2, 5, 10]
    assert accs == sorted(accs) and all(0 <= a <= 1 for a in accs)  # a saturating curve never falls
    assert accs[0] >= result.accuracy_now - 0.02
    for p in result.projections:
        assert p.low <= p.accuracy + 1e-9 and p.accuracy <= p.high + 1e-9 and p.high - p.low < 0.2
    assert {g.name for g in result.per_class} == {"a", "b", "c"}
    assert "more labelled images (2x) would take accuracy from" in result.answer


def test_curve_refuses_a_class_with_fewer_than_five_images() -> None:
    x, y = _blobs(10, 0)
    y[y == 2] = 1
    y[:3] = 2  # class c: three images
    with pytest.raises(DataError, match=r"at least 5 training images.*c \(3\)"):
        curve_from_features(x, y, x, y, ["a", "b", "c"], head=_fixed_head)


def test_learning_curve_writes_its_files_and_refuses_small_classes(
    folder_factory, tiny_weights: Path, cache_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    data = folder_factory("data", {"train": 10, "val": 6})
    # A fixed strength: the head then skips cross-validation, and the test its cost (the slow test runs the default).
    result = headstart.learning_curve(data, out=tmp_path / "curve", seeds=2, strategy="extract",
                                      weights=str(tiny_weights), cache_dir=str(cache_dir), **FAST,
                                      **{"optim.head_c": 0.1})  # fmt: skip
    assert len(result.accuracy) == 2 and len(result.accuracy[0]) == 6 and result.n_train == 20
    for name in ("curve.json", "curve.png", "report.html"):
        assert (tmp_path / "curve" / name).stat().st_size > 0
    assert "Which classes gain most" in (tmp_path / "curve" / "report.html").read_text()
    assert json.loads((tmp_path / "curve" / "curve.json").read_text())["answer"] == result.answer
    small = folder_factory("small", {"train": 4, "val": 3})
    assert main(["curve", str(small), "--backbone", "tiny_cnn", "--out", str(tmp_path / "c3")]) == 2
    err = capsys.readouterr().err
    assert "at least 5 training images" in err and "horizontal (4)" in err
    assert not (tmp_path / "c3").exists()  # refused before anything was computed or written


def test_rank_prefers_uncertain_and_novel_images_over_confident_ones() -> None:
    labelled = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    pool = np.array([[1.0, 0.02, 0.0], [0.02, 1.0, 0.0], [0.98, 0.05, 0.0], [0.7, 0.7, 0.0], [0.0, 0.0, 1.0]])
    probs = np.array([[0.99, 0.01], [0.02, 0.98], [0.97, 0.03], [0.52, 0.48], [0.9, 0.1]])
    ranked = rank_pool(probs, pool, labelled, budget=5)
    assert set(ranked.order[:2].tolist()) == {3, 4}  # the uncertain one and the novel one first
    assert ranked.order[0] == 3 or ranked.order[0] == 4
    assert np.all(np.diff(ranked.score[:3]) <= 1e-9)
    assert rank_pool(probs, pool, labelled, budget=5, diversity=0.0).order[0] == 3  # uncertainty alone
    assert rank_pool(probs, pool, labelled, budget=5, diversity=1.0).order[0] == 4  # novelty alone
    assert uncertainty(np.array([[0.5, 0.5], [1.0, 0.0]])).tolist() == [1.0, 0.0]
    # k-center: after the novel image, its twin is no longer novel
    twin = np.vstack([pool, [[0.0, 0.01, 1.0]]])
    order = rank_pool(np.vstack([probs, [[0.9, 0.1]]]), twin, labelled, budget=3, diversity=1.0).order
    assert order[0] in (4, 5) and order[1] not in (4, 5)


def test_typical_ranking_labels_the_centre_of_each_uncovered_uncertain_group() -> None:
    centres = np.eye(4)[:3] * 10  # A (labelled), B and C (not); an outlier on the fourth axis

    def group(centre: np.ndarray) -> np.ndarray:
        others = [a for a in range(4) if centre[a] == 0]
        ring = [centre + sign * 0.3 * np.eye(4)[a] for a in others for sign in (1, -1)]
        return np.vstack([centre, *ring])  # the centre is the group's most typical image

    labelled = group(centres[0])[:2]
    pool = np.vstack([group(centres[0]), group(centres[1]), group(centres[2]), [[0.0, 0.0, 0.0, 10.0]]])
    b, c, outlier = 7, 14, len(pool) - 1
    probs = np.full((len(pool), 2), [0.95, 0.05])
    probs[b : b + 7] = [0.55, 0.45]  # the model hesitates most over B, then C
    probs[c : c + 7] = [0.7, 0.3]
    probs[outlier] = [0.5, 0.5]  # the most uncertain image of all, but alone
    ranked = rank_typical(probs, pool, labelled, budget=2)
    assert ranked.order.tolist() == [b, c]
    assert ranked.group is not None and ranked.group[:, 1].tolist() == [0, 0]  # both groups had no label yet
    assert ranked.typicality is not None and np.allclose(ranked.typicality, 1.0)
    assert ranked.score[0] >= ranked.score[1]
    everything = rank_typical(probs, pool, labelled, budget=100).order  # budget above the pool: all, once each
    assert sorted(everything.tolist()) == list(range(len(pool)))
    assert rank_typical(probs, pool, np.zeros((0, 4)), budget=3).order.size == 3  # nothing labelled yet


@pytest.fixture
def tiny_run(folder_factory, tiny_weights: Path, cache_dir: Path, tmp_path: Path) -> tuple[Path, Path]:  # type: ignore[no-untyped-def]
    data = folder_factory("data", {"train": 8, "val": 4})
    run = tmp_path / "run"
    headstart.train(data, strategy="extract", weights=str(tiny_weights), out=str(run), cache_dir=str(cache_dir),
                    **FAST, **{"run.report": False})  # fmt: skip
    return run, data


def test_curve_joins_the_run_report(tiny_run: tuple[Path, Path], tiny_weights: Path, tmp_path: Path) -> None:
    run, data = tiny_run
    result = headstart.learning_curve(data, run=run, seeds=2, strategy="extract", weights=str(tiny_weights),
                                      cache_dir=str(tmp_path / "cache"), **FAST, **{"optim.head_c": 0.1})  # fmt: skip
    assert result.out == run / "curve" and (run / "curve" / "curve.png").is_file()
    page = (run / "report.html").read_text()
    assert "Would more labels pay?" in page and result.answer in page
    assert (run / "figures" / "label_curve.png").is_file()
    with pytest.raises(DataError, match="not a run folder"):
        headstart.learning_curve(data, run=tmp_path, **FAST)


def test_suggest_writes_csv_sheet_and_links_and_leaves_out_copies(
    tiny_run: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    run, data = tiny_run
    pool = tmp_path / "pool"
    pool.mkdir()
    rng = np.random.default_rng(7)
    for i in range(10):  # new images, unlike each other and the labelled stripes
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(pool / f"new_{i}.png")
    original = next((data / "train" / "vertical").glob("*.jpg"))
    copy = pool / "copy_of_train.jpg"
    shutil.copy(original, copy)
    Image.open(original).resize((96, 80)).save(pool / "resized_train.png")  # a near copy: other size and format
    (pool / "broken.jpg").write_bytes(b"not an image")
    monkeypatch.setenv("HEADSTART_CACHE", str(tmp_path / "cache"))  # the run's own feature cache
    result = headstart.suggest(run, pool, budget=5, out=tmp_path / "s", symlinks=True)
    assert len(result.suggestions) == 5
    paths = {s.path for s in result.suggestions}
    assert copy not in paths and copy in {p for p, _ in result.excluded}
    reasons = {p.name: why for p, why in result.excluded}
    assert reasons.keys() == {"copy_of_train.jpg", "resized_train.png"}
    assert reasons["copy_of_train.jpg"].startswith("same file as labelled")
    assert reasons["resized_train.png"].startswith(f"near copy of labelled {original}")
    assert [s.path.name for s in result.skipped] == ["broken.jpg"]
    rows = list(csv.DictReader((tmp_path / "s" / "suggestions.csv").open()))
    assert [r["rank"] for r in rows] == ["1", "2", "3", "4", "5"]
    assert set(rows[0]) == {"rank", "path", "score", "predicted", "probability", "uncertainty", "novelty",
                            "typicality", "why"}  # fmt: skip
    assert all(r["predicted"] in ("horizontal", "vertical") for r in rows)
    assert all(r["why"].startswith(("typical of a group", "alone")) for r in rows)
    mixed = headstart.suggest(run, pool, budget=5, method="mix", out=tmp_path / "s3")  # the former default, kept
    assert len(mixed.suggestions) == 5 and all(s.why.startswith(("uncertain", "novel")) for s in mixed.suggestions)
    with pytest.raises(ConfigError, match="unknown suggest method"):
        headstart.suggest(run, pool, budget=5, method="entropy", out=tmp_path / "s4")
    assert (tmp_path / "s" / "contact_sheet.png").stat().st_size > 0
    links = [p for p in (tmp_path / "s" / "by_class").rglob("*") if not p.is_dir()]
    assert len(links) == 5 and all(p.is_symlink() and p.resolve().exists() for p in links)
    # A budget larger than the pool ranks the whole pool and says so; the CLI prints the note.
    code = main(["suggest", str(run), str(pool), "--budget", "50", "--out", str(tmp_path / "s2")])
    out = capsys.readouterr().out
    assert code == 0 and "budget 50 is more than the 10 candidate images" in out
    assert "unreadable file(s) left out" in out and "copies of labelled images" in out
    assert len(list(csv.DictReader((tmp_path / "s2" / "suggestions.csv").open()))) == 10


def test_suggest_bad_input(tiny_run: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run, data = tiny_run
    monkeypatch.setenv("HEADSTART_CACHE", str(tmp_path / "cache"))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "note.jpg").write_bytes(b"text")
    with pytest.raises(DataError, match="no readable image"):
        headstart.suggest(run, empty, budget=3, out=tmp_path / "x")
    with pytest.raises(DataError, match="--budget must be 1 or more"):
        headstart.suggest(run, data / "val", budget=0, out=tmp_path / "x")
    with pytest.raises(DataError, match=r"every image .* is a copy of a labelled image"):
        headstart.suggest(run, data / "val", budget=3, out=tmp_path / "x")
    model = headstart.load(run)
    # embeddings of another width, as features cached for another backbone would be
    monkeypatch.setattr(model, "embed", lambda paths, batch_size=32: np.zeros((len(paths), 7), np.float32))
    with pytest.raises(BackboneError, match="come from another backbone"):
        headstart.suggest(model, data / "val", budget=3, out=tmp_path / "x")
    moved = headstart.load(run)
    moved.info["data_path"] = str(tmp_path / "gone")
    with pytest.raises(DataError, match="--labelled DATA"):
        headstart.suggest(moved, data / "val", budget=3, out=tmp_path / "x")
    assert not (tmp_path / "x").exists()  # nothing written by a refused call
    train_only = load_dataset(data)
    labelled = Dataset(train_only.root, train_only.classes, train_only.train, [])
    # With only the training images labelled, the validation images are new (bar look-alike stripes, left out as
    # near copies by the audit's rule).
    result = headstart.suggest(run, data / "val", budget=3, labelled=labelled, out=tmp_path / "y")
    assert all(why.startswith("near copy of labelled") for _, why in result.excluded) and len(result.excluded) < 8
    assert len(result.suggestions) == min(3, 8 - len(result.excluded))


@pytest.mark.slow
def test_curve_and_suggest_on_ants_and_bees(hymenoptera: Path, tmp_path: Path, ants_bees_cache: Path) -> None:
    """The real weights and the real set: the curve is measured and projected; suggest ranks val as a pool."""
    common = {"strategy": "extract", "backbone": "efficientnet_lite0", "cache_dir": str(ants_bees_cache)}
    curve = headstart.learning_curve(hymenoptera, out=tmp_path / "curve", seeds=2, **common)
    assert curve.n_train == 244 and curve.n_val == 153 and curve.sizes[0] >= 20
    assert 0.85 <= curve.accuracy_now <= 1.0
    two = curve.projections[0]
    assert two.low <= two.accuracy <= two.high and abs(two.accuracy - curve.accuracy_now) < 0.05
    assert (tmp_path / "curve" / "curve.png").stat().st_size > 10_000
    run = headstart.train(hymenoptera, out=str(tmp_path / "run"), **common, **{"run.report": False}).run_dir
    data = load_dataset(hymenoptera)
    labelled = Dataset(data.root, data.classes, data.train, [])  # val plays the unlabelled pool
    result = headstart.suggest(run, hymenoptera / "val", budget=20, labelled=labelled, out=tmp_path / "s")
    assert len(result.suggestions) == 20 and {s.predicted for s in result.suggestions} <= {"ants", "bees"}
    model = headstart.load(run)
    probs, _ = model.predict_proba(data.val, from_cache=True)
    picked = np.mean([s.uncertainty for s in result.suggestions])
    assert picked > float(uncertainty(probs).mean())  # the picks are ones the model is less sure of
    assert (tmp_path / "s" / "contact_sheet.png").stat().st_size > 10_000
