"""Exported ONNX and TorchScript files give the PyTorch model's outputs and carry their own description."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from headstart import __version__
from headstart.data.scan import collect_files
from headstart.data.transforms import Preprocessing, eval_tensor, normalize
from headstart.models.backbones import create_backbone
from headstart.models.classifier import Classifier, load_classifier, save_classifier
from headstart.serving.export import export, read_metadata

TOL = 1e-4  # max abs difference of fp32 logits between PyTorch and the exported file


def make_run(folder: Path, backbone: str, classes: list[str], pretrained: bool, seed: int = 0) -> Path:
    """A run folder holding a classifier with a random head, as ``save_classifier`` writes it after training."""
    torch.manual_seed(seed)
    model = Classifier(create_backbone(backbone, pretrained=pretrained), len(classes))
    save_classifier(model.eval(), folder, {"classes": classes, "strategy": "extract"})
    return folder


def batch(files: list[Path], prep: Preprocessing) -> torch.Tensor:
    """Normalised float NCHW batch, exactly as headstart's own inference decodes the files."""
    return normalize(torch.stack([eval_tensor(f, prep) for f in files]), prep)


def reference(run: Path, x: torch.Tensor, what: str) -> np.ndarray:
    model, _ = load_classifier(run)
    with torch.no_grad():
        return (model(x) if what == "classifier" else model.embed(x)).numpy()


def run_onnx(path: Path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].name == "images"
    out: np.ndarray = session.run(None, {"images": x.numpy()})[0]
    return out


def run_torchscript(path: Path, x: torch.Tensor) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        module = torch.jit.load(str(path), map_location="cpu")
    with torch.no_grad():
        return module(x).numpy()


@pytest.fixture
def tiny_run(tmp_path: Path) -> Path:
    return make_run(tmp_path / "run", "tiny_cnn", ["horizontal", "vertical"], pretrained=False)


@pytest.mark.parametrize("what", ["classifier", "embedder"])
@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
def test_onnx_matches_pytorch_with_dynamic_batch(tiny_run: Path, image_folder: Path, exporter: str, what: str) -> None:
    path = export(tiny_run, "onnx", tiny_run / f"{exporter}.onnx", what, exporter=exporter)
    prep = load_classifier(tiny_run)[0].backbone.preprocessing
    files = collect_files([image_folder / "val"])
    for n in (1, 5):  # exported with a batch of 2, so both sizes prove the batch axis is dynamic
        x = batch(files[:n], prep)
        got, want = run_onnx(path, x), reference(tiny_run, x, what)
        assert got.shape == want.shape == (n, 2 if what == "classifier" else 64)
        assert np.abs(got - want).max() <= TOL
    assert read_metadata(path)["exporter"] == exporter


def test_onnx_metadata_describes_the_model(tiny_run: Path) -> None:
    path = export(tiny_run, "onnx", what="embedder")
    assert path == tiny_run / "embedder.onnx"
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert props["headstart_version"] == __version__
    assert props["backbone"] == "tiny_cnn"
    meta = read_metadata(path)
    assert meta["classes"] == ["horizontal", "vertical"]
    assert meta["what"] == "embedder"
    assert Preprocessing.from_dict(meta["preprocessing"]) == load_classifier(tiny_run)[0].backbone.preprocessing
    assert meta["input"]["shape"] == ["batch", 3, 64, 64] and meta["input"]["dtype"] == "float32"
    assert meta["output"] == {"name": "features", "shape": ["batch", 64]}  # tiny_cnn width
    graph = onnx.load(str(path)).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic, not a fixed size
    assert graph.output[0].name == "features"


def test_uint8_input_normalises_inside_the_graph(tiny_run: Path, image_folder: Path) -> None:
    path = export(tiny_run, "onnx", tiny_run / "u8.onnx", input="uint8")
    prep = load_classifier(tiny_run)[0].backbone.preprocessing
    pixels = torch.stack([eval_tensor(f, prep) for f in collect_files([image_folder / "val"])[:3]])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": pixels.numpy()})[0]
    assert np.abs(got - reference(tiny_run, normalize(pixels, prep), "classifier")).max() <= TOL
    assert read_metadata(path)["input"]["dtype"] == "uint8"


@pytest.mark.parametrize("what", ["classifier", "embedder"])
def test_torchscript_matches_pytorch_and_carries_metadata(tiny_run: Path, image_folder: Path, what: str) -> None:
    path = export(tiny_run, "torchscript", what=what)
    assert path.name == f"{what}.torchscript.pt"
    prep = load_classifier(tiny_run)[0].backbone.preprocessing
    files = collect_files([image_folder / "train"])
    for n in (1, 5):
        x = batch(files[:n], prep)
        assert np.abs(run_torchscript(path, x) - reference(tiny_run, x, what)).max() <= TOL
    meta = read_metadata(path)
    assert meta["classes"] == ["horizontal", "vertical"] and meta["what"] == what and meta["format"] == "torchscript"


def test_bad_arguments_name_the_choices(tiny_run: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown format 'tflite'; choose one of onnx, torchscript"):
        export(tiny_run, "tflite")
    with pytest.raises(ValueError, match="unknown what"):
        export(tiny_run, "onnx", what="decoder")
    with pytest.raises(FileNotFoundError, match=r"model\.json"):
        export(tmp_path / "not-a-run")
    stranger = tmp_path / "plain.onnx"
    model = onnx.helper.make_model(
        onnx.helper.make_graph(
            [onnx.helper.make_node("Identity", ["x"], ["y"])], "g",
            [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
            [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
        )
    )  # fmt: skip
    onnx.save(model, str(stranger))
    with pytest.raises(ValueError, match="no headstart metadata"):
        read_metadata(stranger)


@pytest.mark.slow
def test_real_efficientnet_lite0_on_ants_and_bees(tmp_path: Path, hymenoptera: Path) -> None:
    run = make_run(tmp_path / "run", "efficientnet_lite0", ["ants", "bees"], pretrained=True)
    val = hymenoptera / "val"
    files = sorted((val / "ants").glob("*.jpg"))[:4] + sorted((val / "bees").glob("*.jpg"))[:4]
    model = load_classifier(run)[0]
    prep = model.backbone.preprocessing
    onnx_path, script_path = export(run, "onnx"), export(run, "torchscript")
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.load(str(script_path), map_location="cpu")
    x = batch(files, prep)
    with torch.no_grad():
        want, traced = model(x).numpy(), scripted(x).numpy()
    for n in (1, 5):  # the exporters saw a batch of 2
        assert np.abs(session.run(None, {"images": x[:n].numpy()})[0] - want[:n]).max() <= TOL
    assert np.abs(session.run(None, {"images": x.numpy()})[0] - want).max() <= TOL
    assert traced.shape == (8, 2) and np.abs(traced - want).max() <= TOL
    meta = read_metadata(onnx_path)
    assert meta["preprocessing"]["input_size"] == 224 and meta["classes"] == ["ants", "bees"]


def test_cli_export_writes_the_file(tiny_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    from headstart.cli import COMMANDS
    from headstart.cli.serve import add_parsers

    parser = argparse.ArgumentParser()
    add_parsers(parser.add_subparsers(dest="command"))
    out = tiny_run / "cli.pt"
    args = parser.parse_args(["export", str(tiny_run), "--format", "torchscript", "--out", str(out)])
    assert COMMANDS["export"](args) == 0
    assert f"wrote {out}" in capsys.readouterr().out and read_metadata(out)["format"] == "torchscript"
