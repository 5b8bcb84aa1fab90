"""The Hugging Face Hub without the network: ``hf-hub:`` backbones, ``push`` (card, weights, config), ``pull`` and
``load`` of a hub id, and the offline errors, all through huggingface_hub's real clients against a loopback hub
(tests/fake_hub.py) whose repositories are folders laid out as the hub lays out a model repository."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml

import headstart
from fake_hub import FakeHub, serve
from headstart.cli.app import main
from headstart.errors import BackboneError
from headstart.models.backbones import create_backbone
from headstart.models.hub import HubError, pull
from headstart.serving.hub import model_card, push

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    """A loopback hub as HF_ENDPOINT, an empty hub cache, a token, and the network switched on."""
    import huggingface_hub.constants as hf_constants

    with serve(tmp_path / "hub") as fake:
        monkeypatch.setattr(hf_constants, "ENDPOINT", fake.endpoint)
        monkeypatch.setattr(
            hf_constants, "HUGGINGFACE_CO_URL_TEMPLATE", fake.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
        )
        monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
        monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(tmp_path / "no-saved-token"))
        monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("HF_TOKEN", "hf_test_token")
        yield fake


def go_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)


def timm_repo(hub: FakeHub, repo_id: str, arch: str = "test_resnet") -> torch.nn.Module:
    """A timm model repository, written by timm's own ``save_for_hf`` (what ``timm.models.push_to_hub`` uploads)."""
    from timm.models import save_for_hf

    torch.manual_seed(7)
    net = timm.create_model(arch).eval()
    save_for_hf(net, str(hub.repo(repo_id)), safe_serialization=True)
    hub.commit(repo_id)
    return net


@pytest.fixture
def trained(tmp_path: Path, image_folder: Path, tiny_weights: Path) -> Path:
    """A small trained classifier (tiny_cnn, extract) with its metrics, as `headstart train` leaves it."""
    result = headstart.train(
        image_folder, strategy="extract", backbone="tiny_cnn", weights=str(tiny_weights), out=tmp_path / "run",
        cache_dir=tmp_path / "cache", **{"run.report": False},
    )  # fmt: skip
    return Path(result.run_dir)


def probabilities(model: headstart.Model, images: Path) -> np.ndarray:
    rows, _ = model.predict(images, top_k=2)
    return np.array([[dict(r.top)[c] for c in model.classes] for r in sorted(rows, key=lambda r: r.path.name)])


# -- hf-hub: backbones -------------------------------------------------------------------------------------------


def test_hf_hub_backbone_downloads_once_then_works_offline(hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    source = timm_repo(hub, "someone/test-resnet")
    backbone = create_backbone("hf-hub:someone/test-resnet").eval()
    assert backbone.weights_source == "hub:someone/test-resnet"
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        expected = source.forward_head(source.forward_features(x), pre_logits=True)
        torch.testing.assert_close(backbone(x), expected)
    go_offline(monkeypatch)
    again = create_backbone("hf-hub:someone/test-resnet").eval()  # from the hub cache
    with torch.inference_mode():
        torch.testing.assert_close(again(x), expected)
    with pytest.raises(BackboneError) as info:
        create_backbone("hf-hub:someone/never-downloaded")
    message = str(info.value)
    assert "'hf-hub:someone/never-downloaded'" in message and "--weights" in message and "config.json" in message


def test_a_model_on_a_hf_hub_backbone_travels_and_loads_offline(
    hub: FakeHub, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, image_folder: Path
) -> None:
    """train accepts the name; the model it leaves, pushed and pulled on a machine with an empty hub cache, loads
    with the network off (pull also fetched the backbone's config.json, which rebuilds its architecture)."""
    import huggingface_hub.constants as hf_constants

    timm_repo(hub, "someone/test-resnet")
    result = headstart.train(
        image_folder, strategy="extract", backbone="hf-hub:someone/test-resnet", out=tmp_path / "run",
        cache_dir=tmp_path / "cache", **{"run.report": False},
    )  # fmt: skip
    expected = probabilities(headstart.load(result.run_dir), image_folder / "val")
    push(result.run_dir, "me/on-a-hub-backbone")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "another-machine"))
    folder = pull("me/on-a-hub-backbone")
    go_offline(monkeypatch)
    model = headstart.load(folder)
    assert model.info["backbone"] == "hf-hub:someone/test-resnet"
    np.testing.assert_allclose(probabilities(model, image_folder / "val"), expected, atol=1e-6)


def test_local_dir_backbone_is_read_by_timms_rules(tmp_path: Path) -> None:
    from timm.models import save_for_hf

    torch.manual_seed(3)
    source = timm.create_model("test_convnext").eval()
    save_for_hf(source, str(tmp_path / "net"), safe_serialization=True)
    backbone = create_backbone(f"local-dir:{tmp_path / 'net'}").eval()
    assert backbone.weights_source == f"file:{tmp_path / 'net'}"
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(backbone(x), source.forward_head(source.forward_features(x), pre_logits=True))


def test_unknown_source_prefix_is_an_unknown_backbone() -> None:
    with pytest.raises(BackboneError, match=r"unknown backbone 'hf-hubb:x/y'.*hf-hub:ORG/NAME"):
        create_backbone("hf-hubb:x/y", pretrained=False)


# -- push, pull, load ----------------------------------------------------------------------------------------------


def test_push_then_pull_predicts_exactly_as_the_run(
    hub: FakeHub, monkeypatch: pytest.MonkeyPatch, trained: Path, image_folder: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    assert main(["push", str(trained), "--repo", "me/stripes"]) == 0
    assert "pushed" in capsys.readouterr().out
    assert sorted(hub.files("me/stripes")) == [
        "README.md", "config.yaml", "metrics.json", "model.json", "model.safetensors"
    ]  # fmt: skip
    assert (hub.repo("me/stripes") / "model.safetensors").read_bytes() == (trained / "model.safetensors").read_bytes()
    assert (hub.repo("me/stripes") / "README.md").read_text() == (trained / "README.md").read_text()
    # this machine's paths (data, weights file, output, cache) are cut to their last part; the rest is as written
    local = json.loads((trained / "model.json").read_text())
    pushed = json.loads((hub.repo("me/stripes") / "model.json").read_text())
    assert str(image_folder) in json.dumps(local) and str(trained) in (trained / "config.yaml").read_text()
    for name in ("model.json", "config.yaml"):
        text = (hub.repo("me/stripes") / name).read_text()
        assert str(image_folder) not in text and str(trained) not in text and str(tmp_path.parent) not in text, name
    assert pushed["data_path"] == image_folder.name and pushed["classes"] == local["classes"]
    assert {k: v for k, v in pushed.items() if v == local[k]}.keys() >= {"backbone", "preprocessing", "strategy"}

    assert main(["pull", "me/stripes", "--out", str(tmp_path / "pulled")]) == 0
    expected = probabilities(headstart.load(trained), image_folder / "val")
    np.testing.assert_array_equal(probabilities(headstart.load(tmp_path / "pulled"), image_folder / "val"), expected)
    np.testing.assert_array_equal(probabilities(headstart.load("hf-hub:me/stripes"), image_folder / "val"), expected)
    go_offline(monkeypatch)  # pulled once: the hub cache serves it
    np.testing.assert_array_equal(probabilities(headstart.load("hf-hub:me/stripes"), image_folder / "val"), expected)


def test_model_card_says_what_the_model_is(trained: Path) -> None:
    text = model_card(trained, "me/stripes")
    _, front, body = text.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta["library_name"] == "headstart" and meta["pipeline_tag"] == "image-classification"
    assert {"headstart", "image-classification", "extract"} <= set(meta["tags"])
    assert meta["datasets"] == ["data"] and "accuracy" in meta["metrics"]
    result = meta["model-index"][0]["results"][0]
    assert result["task"]["type"] == "image-classification"
    assert {m["type"] for m in result["metrics"]} >= {"accuracy", "balanced_accuracy"}
    for heading in ("## Model", "## Data", "## Preprocessing", "## Metrics", "## Intended use", "## How to use"):
        assert heading in body, heading
    assert "`horizontal`" in body and "| vertical | 10 | 5 |" in body
    assert "resize the shorter side to 72 px" in body and "mean (0.5, 0.5, 0.5)" in body
    assert 'headstart.load("hf-hub:me/stripes")' in body and "headstart pull me/stripes" in body
    assert str(trained.parent) not in text  # the card is public: no local paths


def test_an_edited_card_is_pushed_as_it_is(hub: FakeHub, trained: Path) -> None:
    assert (
        push(trained, "me/stripes", dry_run=True)
        == "model.safetensors, model.json, config.yaml, metrics.json, README.md"
    )
    assert "me/stripes" not in hub.commits  # a dry run uploads nothing
    card = trained / "README.md"
    card.write_text(card.read_text().replace("## Model", "## Model\n\nHand-written note."))
    push(trained, "hf-hub:me/stripes")
    assert "Hand-written note." in (hub.repo("me/stripes") / "README.md").read_text()


def test_push_without_a_token_says_how_to_log_in(
    hub: FakeHub, monkeypatch: pytest.MonkeyPatch, trained: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("HF_TOKEN")
    before = sorted(p.name for p in trained.iterdir())
    assert main(["push", str(trained), "--repo", "me/stripes"]) == 2
    assert "hf auth login" in capsys.readouterr().err
    assert sorted(p.name for p in trained.iterdir()) == sorted({*before, "README.md"})  # the run is untouched


def test_offline_push_and_pull_name_what_to_do(
    hub: FakeHub, monkeypatch: pytest.MonkeyPatch, trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: connection refused
    assert main(["push", str(trained), "--repo", "me/stripes"]) == 2
    assert "cannot reach the hub to push to me/stripes" in capsys.readouterr().err
    go_offline(monkeypatch)
    assert main(["push", str(trained), "--repo", "me/stripes"]) == 2
    assert "Connect to the internet" in capsys.readouterr().err
    assert main(["pull", "me/stripes"]) == 2
    err = capsys.readouterr().err
    assert "me/stripes" in err and "Connect to the internet" in err and "pulled before works offline" in err
    with pytest.raises(HubError, match="me/stripes"):
        headstart.load("hf-hub:me/stripes")


def test_pull_keeps_an_existing_folder_and_refuses_what_is_not_a_model(
    hub: FakeHub, trained: Path, tmp_path: Path
) -> None:
    push(trained, "me/stripes")
    out = tmp_path / "busy"
    out.mkdir()
    (out / "model.json").write_text("mine")
    with pytest.raises(FileExistsError, match="--overwrite"):
        pull("me/stripes", out=out)
    assert (out / "model.json").read_text() == "mine"
    assert (pull("me/stripes", out=out, overwrite=True) / "model.json").read_text() != "mine"
    timm_repo(hub, "someone/test-resnet")
    with pytest.raises(HubError, match=r"no headstart model.*--backbone hf-hub:someone/test-resnet"):
        pull("someone/test-resnet")
    with pytest.raises(HubError, match="no model repository someone/missing"):
        pull("someone/missing")
    with pytest.raises(HubError, match="ORG/NAME"):
        pull("not-a-repo-id")
