"""int8 export: onnxruntime's static quantization calibrated on the run's images, checked against fp32, refused with
a clear message when it cannot keep the predictions; exported ONNX files load and predict through ``headstart.load``.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

import headstart
from headstart.data.scan import collect_files
from headstart.errors import IntegrityError
from headstart.hardware import int8_saturates
from headstart.insight.predictor import load
from headstart.models.backbones import create_backbone
from headstart.models.classifier import Classifier, load_classifier, save_classifier
from headstart.serving.export import export, read_metadata
from headstart.serving.quantize import QuantizationError

FAST = {"backbone": "tiny_cnn", "batch_size": 8, "num_workers": 0, "run.report": False}


@pytest.fixture(scope="module")
def tiny_extract(tmp_path_factory: pytest.TempPathFactory, tiny_weights: Path) -> Path:
    """An extract run of tiny_cnn on synthetic stripes: a fitted head on a real run folder that names its data."""
    from conftest import make_folder

    root = tmp_path_factory.mktemp("quantize")
    data = make_folder(root / "data", {"train": 10, "val": 5})
    out = root / "run"
    headstart.train(data, strategy="extract", weights=str(tiny_weights), out=str(out), cache_dir=str(root / "c"),
                    **FAST)  # fmt: skip
    return out


def cli(*argv: str) -> int:
    from headstart.cli import COMMANDS
    from headstart.cli.serve import add_parsers

    parser = argparse.ArgumentParser()
    add_parsers(parser.add_subparsers(dest="command"))
    args = parser.parse_args(list(argv))
    return int(COMMANDS[args.command](args))


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_cli_writes_int8_beside_fp32_with_metadata(tiny_extract: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("export", str(tiny_extract), "--quantize", "int8") == 0
    fp32, int8 = tiny_extract / "classifier.onnx", tiny_extract / "classifier.int8.onnx"
    out = capsys.readouterr().out
    assert f"wrote {int8}" in out and "int8 top-1 agreement with fp32: 1.000 on 10 images (validation split" in out
    meta, plain = read_metadata(int8), read_metadata(fp32)
    assert meta["precision"] == "int8" and "precision" not in plain
    for key in ("classes", "preprocessing", "input", "output", "backbone", "exporter"):
        assert meta[key] == plain[key], key
    record = meta["quantization"]
    assert record["calibration_images"] == 20 and record["calibration_source"].startswith("training split of")
    assert record["agreement"] == 1.0 and record["accuracy_int8"] == record["accuracy_fp32"]
    assert "QuantizeLinear" in {n.op_type for n in __import__("onnx").load(str(int8)).graph.node}
    assert record["weight_bits"] == (7 if int8_saturates() else 8)


@pytest.mark.parametrize("saturates_here", [False, True])
def test_weight_bits_follow_the_cpu_and_loading_warns_where_8_bits_saturate(
    tiny_extract: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, saturates_here: bool
) -> None:
    """A file made with 8-bit weights (on a CPU with VNNI) warns when loaded on one without; 7-bit files never do."""
    import warnings

    import headstart.models.exported as exported
    import headstart.serving.quantize as quantize

    monkeypatch.setattr(quantize, "int8_saturates", lambda: saturates_here)  # the exporting CPU
    path = export(tiny_extract, "onnx", tmp_path / "model.onnx", quantize="int8")
    assert read_metadata(path)["quantization"]["weight_bits"] == (7 if saturates_here else 8)
    monkeypatch.setattr(exported, "int8_saturates", lambda: True)  # the serving CPU: AVX2 without VNNI
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load(path)
    said = [str(w.message) for w in caught if "saturate" in str(w.message)]
    assert len(said) == (0 if saturates_here else 1)
    if said:
        assert str(path) in said[0] and "--quantize int8" in said[0]
    monkeypatch.setattr(exported, "int8_saturates", lambda: False)  # a CPU with VNNI: nothing to say
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load(path)
    assert not [w for w in caught if "saturate" in str(w.message)]


def test_exported_onnx_loads_predicts_and_evaluates(tiny_extract: Path) -> None:
    if not (tiny_extract / "classifier.int8.onnx").is_file():
        export(tiny_extract, "onnx", quantize="int8")
    torch_model = load(tiny_extract)
    torch_model.precision = "fp32"  # the exports are fp32; a CPU with bf16 would run the PyTorch model in bf16
    data = Path(torch_model.info["data_path"])
    files = collect_files([data / "val"])
    want, _ = torch_model.predict_proba(files, from_cache=False)
    fp32 = load(tiny_extract / "classifier.onnx")
    got, out = fp32.predict_proba(files)
    assert out.ok.all() and np.abs(got - want).max() < 1e-4
    int8 = load(tiny_extract / "classifier.int8.onnx")
    assert int8.classes == torch_model.classes and int8.preprocessing == torch_model.preprocessing
    rows, failed = int8.predict(data / "val")
    assert not failed and [r.label for r in rows] == [torch_model.classes[i] for i in want.argmax(1)]
    assert int8.evaluate(data)["accuracy"] == pytest.approx(torch_model.evaluate(data)["accuracy"])
    with pytest.raises(ValueError, match="ONNX export: it predicts and evaluates, but has no PyTorch network"):
        int8.classifier  # noqa: B018 - the property is what is tested


def test_unquantizable_model_is_refused_and_nothing_is_lost(tiny_extract: Path, tmp_path: Path) -> None:
    """One feature channel a thousand times larger than the rest (and unused by the head): int8 gives each tensor
    256 levels, so the features that decide the class all round to zero. Refused, with what to do instead."""
    model, info = load_classifier(tiny_extract)
    last_norm = [m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)][-1]
    head = model.head
    assert isinstance(head, torch.nn.Linear)
    with torch.no_grad():
        last_norm.bias[0] += 1000.0
        head.weight[:, 0] = 0.0
    run = tmp_path / "run"
    save_classifier(model.eval(), run, {k: info[k] for k in ("classes", "strategy", "data_path")})
    (run / "classifier.int8.onnx").write_bytes(b"an earlier int8 export")
    before = digests(run)
    with pytest.raises(QuantizationError) as caught:
        export(run, "onnx", quantize="int8")
    message = str(caught.value)
    assert "int8 quantization refused: its top-1 agreement with fp32 is" in message
    assert f"Use the fp32 export {run / 'classifier.onnx'}, which is intact" in message
    assert "--calibration DIR" in message and "--min-agreement" in message
    after = digests(run)
    assert after.pop("classifier.onnx") and after.pop("checksums.json") != before.pop("checksums.json")
    assert after == before  # the model files and the earlier int8 file are untouched; the manifest lists the export
    assert load(run).classes == ["horizontal", "vertical"]  # and still vouches for the model files
    data = Path(info["data_path"])
    fp32 = load(run / "classifier.onnx")
    assert fp32.evaluate(data)["accuracy"] >= 0.7  # the fp32 export works (and still classifies)
    assert [p.name for p in run.iterdir() if p.name.startswith(".")] == []  # no temporary files left
    with (run / "classifier.onnx").open("ab") as handle:
        handle.write(b"\0")
    with pytest.raises(IntegrityError, match=r"classifier\.onnx was modified or replaced"):
        load(run / "classifier.onnx")


def test_quantize_options_are_checked_before_any_work(tmp_path: Path, image_folder: Path) -> None:
    run = tmp_path / "run"
    save_classifier(Classifier(create_backbone("tiny_cnn", pretrained=False), 2).eval(), run, {"classes": ["a", "b"]})
    before = digests(run)
    with pytest.raises(ValueError, match=r"is for ONNX classifiers .* export with --format onnx --what classifier"):
        export(run, "torchscript", quantize="int8")
    with pytest.raises(ValueError, match="--format onnx --what classifier, or drop --quantize for a onnx embedder"):
        export(run, "onnx", what="embedder", quantize="int8")
    with pytest.raises(ValueError, match="unknown quantize 'int4'; choose one of int8"):
        export(run, "onnx", quantize="int4")
    with pytest.raises(ValueError, match="give at least one image and an agreement between 0 and 1"):
        export(run, "onnx", quantize="int8", min_agreement=99)
    with pytest.raises(QuantizationError, match="names no training data; pass --calibration DIR"):
        export(run, "onnx", quantize="int8")
    assert digests(run) == before


def test_load_refuses_exports_it_cannot_run(tmp_path: Path) -> None:
    run = tmp_path / "run"
    save_classifier(Classifier(create_backbone("tiny_cnn", pretrained=False), 2).eval(), run, {"classes": ["a", "b"]})
    with pytest.raises(ValueError, match="is an exported embedder, not a classifier"):
        load(export(run, "onnx", what="embedder"))
    with pytest.raises(ValueError, match=r"takes uint8 pixels; .* --input float"):
        load(export(run, "onnx", run / "u8.onnx", input="uint8"))
    with pytest.raises(FileNotFoundError, match="export a model first"):
        load(run / "missing.onnx")


def test_service_serves_the_int8_model(tiny_extract: Path) -> None:
    import httpx

    from headstart.serving.serve import create_app, serve_in_thread

    int8 = tiny_extract / "classifier.int8.onnx"
    if not int8.is_file():
        export(tiny_extract, "onnx", quantize="int8")
    model = load(int8)
    files = collect_files([Path(load(tiny_extract).info["data_path"]) / "val"])[:3]
    want = [r.label for r in model.predict(files)[0]]
    with serve_in_thread(create_app(int8)) as url, httpx.Client(base_url=url, timeout=30) as client:
        assert client.get("/health").json()["classes"] == model.classes
        response = client.post("/predict", files=[("files", (f.name, f.read_bytes(), "image/jpeg")) for f in files])
        assert response.status_code == 200
        assert [r["label"] for r in response.json()["results"]] == want
        flipped = client.post("/predict?tta=flip", files=[("files", (files[0].name, files[0].read_bytes()))])
        assert flipped.status_code == 400 and "flip" in flipped.json()["detail"]  # an export has one preprocessing


@pytest.mark.slow
def test_int8_efficientnet_lite0_agrees_with_fp32_on_ants_and_bees(hymenoptera: Path, tmp_path: Path) -> None:
    # Under pytest-xdist (2026-12-06/07) the export refused at 0.967 in two of three runs, once with this private
    # cache and once with a shared one; serial runs passed. Cause not found; `make test` runs this file in a process
    # of its own, after the xdist run of the others.
    result = headstart.train(hymenoptera, strategy="extract", backbone="efficientnet_lite0", out=str(tmp_path / "run"),
                             cache_dir=str(tmp_path / "cache"), **{"run.report": False})  # fmt: skip
    run = result.run_dir
    # 153 images: one flip is 0.65 points, so agreement alone is a coarse check. The largest logit change is the
    # fine one: 0.40 on a CPU with VNNI, 0.71 with 7-bit weights on AVX2 alone, 1.55 with saturating 8-bit weights.
    int8_path = export(run, "onnx", quantize="int8", min_agreement=0.98)
    record = read_metadata(int8_path)["quantization"]
    assert record["images"] == 153 and record["agreement"] >= 0.98 and record["max_abs_logit_diff"] < 1.0
    assert len(record["fp32_nodes"]) == 2  # the first convolution and the head
    # Independently of the export's own check: the int8 file against the PyTorch model, through headstart.load.
    files = collect_files([hymenoptera / "val"])
    fp32 = load(run)
    fp32.precision = "fp32"  # the run's own precision is bf16 on a CPU that has it
    fp32_probs, fp32_out = fp32.predict_proba(files, from_cache=False)
    int8_probs, int8_out = load(int8_path).predict_proba(files)
    assert fp32_out.ok.sum() == int8_out.ok.sum() == 153
    assert (fp32_probs.argmax(1) == int8_probs.argmax(1)).mean() >= 0.98
    truth = np.array([["ants", "bees"].index(f.parent.name) for f in files])
    assert (int8_probs.argmax(1) == truth).mean() >= 0.94
    assert int8_path.stat().st_size < 0.35 * (run / "classifier.onnx").stat().st_size
