"""Dataset audit: planted duplicates, leakage, conflicts and flipped labels must be found; files are never touched."""

from __future__ import annotations

import argparse
import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from headstart import cli
from headstart.cli.audit import add_parsers
from headstart.data.scan import load_dataset
from headstart.insight.audit import audit, find_groups, near_pairs, quick_audit, write_clean_manifest


def plant_copies(root: Path) -> dict[str, set[frozenset[str]]]:
    """Byte copies into a train/val folder: a duplicate, a leak, a conflict; returns the planted groups by kind."""
    train = root / "train"
    shutil.copy(train / "horizontal" / "horizontal_000.jpg", train / "horizontal" / "copy_of_000.jpg")
    shutil.copy(train / "vertical" / "vertical_001.jpg", root / "val" / "vertical" / "leaked_001.jpg")
    shutil.copy(train / "horizontal" / "horizontal_002.jpg", train / "vertical" / "conflict_002.jpg")
    return {
        "duplicate": {frozenset({"horizontal_000.jpg", "copy_of_000.jpg"})},
        "leakage": {frozenset({"vertical_001.jpg", "leaked_001.jpg"})},
        "conflict": {frozenset({"horizontal_002.jpg", "conflict_002.jpg"})},
    }


def test_quick_audit_warns_about_leakage_and_conflicts(image_folder: Path) -> None:
    assert quick_audit(load_dataset(image_folder)) == []
    plant_copies(image_folder)
    warnings = quick_audit(load_dataset(image_folder))
    assert len(warnings) == 2
    assert warnings[0].startswith("leakage: 1 val/test image") and "leaked_001.jpg" in warnings[0]
    assert warnings[1].startswith("label conflicts: 1 image")


def test_exact_audit_reports_and_cleans_without_touching_files(image_folder: Path, tmp_path: Path) -> None:
    planted = plant_copies(image_folder)
    Image.new("RGB", (50, 50), "white").save(image_folder / "train" / "vertical" / "imageNotFound.gif")
    (image_folder / "val" / "horizontal" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    before = sorted((p, p.stat().st_mtime_ns) for p in image_folder.rglob("*"))

    result = audit(image_folder, backbone=None, out=tmp_path / "report")

    found = {g.kind: {frozenset(m.path.name for m in g.members)} for g in result.groups}
    assert found == planted and all(g.exact for g in result.groups)
    assert result.counts() == {"duplicate": 2, "leakage": 2, "conflict": 2, "placeholder": 1, "unreadable": 1}
    rows = list(csv.DictReader((tmp_path / "report" / "audit.csv").open()))
    assert {(r["kind"], Path(r["path"]).name, r["split"]) for r in rows} >= {
        ("placeholder", "imageNotFound.gif", "train"),
        ("unreadable", "broken.jpg", "val"),
        ("leakage", "leaked_001.jpg", "val"),
        ("conflict", "conflict_002.jpg", "train"),
    }
    page = (tmp_path / "report" / "audit.html").read_text()
    assert page.count("<img") == 7  # every decodable flagged file (6 in groups + the placeholder) has a thumbnail
    assert len(list((tmp_path / "report" / "thumbs").glob("*.jpg"))) == 7
    assert result.stats["images"] == {"train": 22, "val": 11, "test": 0} and result.stats["modes"] == {"RGB": 33}

    kept = write_clean_manifest(result, tmp_path / "clean.csv")
    clean = load_dataset(tmp_path / "clean.csv")
    kept_paths = {r.path.relative_to(image_folder).as_posix() for r in clean.train + clean.val}
    assert kept == 33 - 1 - 1 - 2 == len(kept_paths)  # one copy of the duplicate and of the leak, no conflict member
    assert len(kept_paths & {"train/horizontal/horizontal_000.jpg", "train/horizontal/copy_of_000.jpg"}) == 1
    assert "train/vertical/vertical_001.jpg" in kept_paths and "val/vertical/leaked_001.jpg" not in kept_paths
    assert not kept_paths & {"train/horizontal/horizontal_002.jpg", "train/vertical/conflict_002.jpg"}
    assert quick_audit(clean) == []
    assert sorted((p, p.stat().st_mtime_ns) for p in image_folder.rglob("*")) == before
    with pytest.raises(ValueError, match="unknown drop"):
        write_clean_manifest(result, tmp_path / "x.csv", drop=["everything"])


def test_near_pairs_and_groups_are_split_aware(image_folder: Path) -> None:
    ds = load_dataset(image_folder)
    records = ds.train[:3] + ds.val[:1]
    splits = ["train", "train", "train", "val"]
    features = np.eye(4)[[0, 1, 2, 0]] + 0.01
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    pairs = near_pairs(features, 0.9, block=2)
    assert [(i, j) for i, j, _ in pairs] == [(0, 3)]
    (group,) = find_groups(records, splits, ds.classes, pairs)
    assert group.kind == "leakage" and not group.exact and group.name == "near_leakage"
    assert {m.split for m in group.members} == {"train", "val"}


def test_audit_cli(image_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plant_copies(image_folder)
    parser = argparse.ArgumentParser()
    add_parsers(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["audit", str(image_folder), "--backbone", "none", "--out", str(tmp_path / "a"),
                              "--fix", str(tmp_path / "clean.csv"), "--drop", "duplicates"])  # fmt: skip
    assert cli.COMMANDS["audit"](args) == 0
    out = capsys.readouterr().out
    assert "flagged files: conflict 2, duplicate 2, leakage 2" in out and "cleaned manifest with 31 images" in out


@pytest.mark.slow
def test_ants_and_bees_audit_flags_the_placeholder(hymenoptera: Path, tmp_path: Path) -> None:
    result = audit(hymenoptera, backbone=None, out=tmp_path)
    assert [(s.path.name, r) for s in result.unreadable for r in [s.reason[:11]]] == [
        ("imageNotFound.gif", "placeholder")
    ]
    exact_leaks = [g for g in result.groups if g.exact and g.kind == "leakage"]
    assert exact_leaks == []  # the published set has no byte-identical train/val pair


def reencode(source: Path, target: Path, scale: float, quality: int) -> None:
    image = Image.open(source).convert("RGB")
    image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC).save(
        target, quality=quality
    )


@pytest.mark.slow
def test_planted_problems_in_real_photos_are_found(hymenoptera: Path, tmp_path: Path) -> None:
    """Real ants/bees photos with planted copies, near copies, conflicts and flipped labels (efficientnet_lite0)."""
    root = tmp_path / "data"
    rng = np.random.default_rng(0)
    pools = {c: sorted((hymenoptera / "train" / c).glob("*.jpg")) for c in ("ants", "bees")}
    other = {"ants": "bees", "bees": "ants"}
    planted: list[tuple[str, frozenset[str]]] = []
    flipped: set[str] = set()
    for split in ("train", "val"):
        for c in pools:
            (root / split / c).mkdir(parents=True)
    for c, files in pools.items():
        chosen = [files[i] for i in rng.permutation(len(files))[:46]]
        train, val, spare = chosen[:32], chosen[32:40], chosen[40:]
        for split, group in (("train", train), ("val", val)):
            for f in group:
                shutil.copy(f, root / split / c / f.name)
        for i in range(2):  # exact duplicates within train
            shutil.copy(train[i], root / "train" / c / f"dup_{train[i].name}")
            planted.append(("duplicate", frozenset({train[i].name, f"dup_{train[i].name}"})))
        shutil.copy(train[2], root / "val" / c / f"leak_{train[2].name}")  # exact copy across splits
        planted.append(("leakage", frozenset({train[2].name, f"leak_{train[2].name}"})))
        for i, (scale, quality) in enumerate(((0.75, 80), (0.6, 85)), start=3):  # resized, re-encoded copies in val
            reencode(train[i], root / "val" / c / f"near_{train[i].name}", scale, quality)
            planted.append(("near_leakage", frozenset({train[i].name, f"near_{train[i].name}"})))
        shutil.copy(train[5], root / "train" / other[c] / f"conflict_{train[5].name}")
        planted.append(("conflict", frozenset({train[5].name, f"conflict_{train[5].name}"})))
        for f in spare[:3]:  # flipped labels: a real photo of this class filed under the other one
            shutil.copy(f, root / "train" / other[c] / f"flip_{f.name}")
            flipped.add(f"flip_{f.name}")

    result = audit(root, cache_dir=tmp_path / "cache", out=tmp_path / "report", batch_size=16)

    found = {(g.name, frozenset(m.path.name for m in g.members)) for g in result.groups}
    hits = [p for p in planted if p in found]
    recall = len(hits) / len(planted)
    precision = len(hits) / max(len(found), 1)
    flagged = {i.path.name for i in result.label_issues}
    # A conflict copy is a real label error too (one of its two labels is wrong).
    true_flags = flagged & (flipped | {n for kind, g in planted if kind == "conflict" for n in g})
    flip_recall = len(flagged & flipped) / len(flipped)
    flip_precision = len(true_flags) / max(len(flagged), 1)
    print(f"\nduplicates/conflicts: recall {recall:.3f} ({len(hits)}/{len(planted)}), precision {precision:.3f} "
          f"({len(found)} groups); flipped labels: recall {flip_recall:.3f}, precision {flip_precision:.3f} "
          f"({len(flagged)} flagged); {result.seconds:.1f} s")  # fmt: skip
    assert recall >= 0.95, sorted(set(planted) - found)
    assert flip_recall >= 0.5, flagged
