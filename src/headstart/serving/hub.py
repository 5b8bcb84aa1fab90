"""Publish a trained model to the Hugging Face Hub: a model card, the weights and their description.

:func:`push` writes the run's model card (``README.md``: YAML metadata for the hub's search and widgets, then what
the model is, what it was trained on and how, its preprocessing, its metrics, its intended use and how to load it)
and uploads it with the run's ``model.safetensors``, ``model.json``, ``config.yaml`` and ``metrics.json`` through
``huggingface_hub`` (``HfApi.create_repo`` and ``upload_folder``), so ``HF_TOKEN``, ``HF_ENDPOINT`` and the login of
``hf auth login`` work as for any hub upload. :func:`headstart.models.hub.pull` downloads it again as a run folder.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from headstart import progress
from headstart.files import atomic_write_bytes
from headstart.models.classifier import read_model_info
from headstart.models.hub import CARD, MODEL_FILES, HubError, offline_error, split_ref

# Tags every card carries (the strategy and backbone family are added per model).
TAGS = ("headstart", "image-classification", "transfer-learning")
_STRATEGY = {
    "auto": "frozen pretrained features and a logistic head chosen by cross-validation (headstart's default recipe)",
    "extract": "frozen pretrained features and a new head (feature extraction)",
    "finetune": "a new head, then the whole network fine-tuned at a lower learning rate for the backbone",
    "scratch": "the architecture trained from random weights",
}


def push(
    run: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
    dataset: str | None = None,
    dry_run: bool = False,
) -> str:
    """Upload a trained classifier's files and model card to a hub repository (created when missing).

    The card is written to ``RUN/README.md`` first unless that file exists: a card edited by hand is uploaded as it
    is (delete it to have it written again). The run folder is otherwise left as it was.

    Args:
        run: run folder made by ``headstart train``.
        repo_id: ``org/name`` (or ``hf-hub:org/name``).
        private: create the repository private (an existing one keeps its visibility).
        token: hub token; default: ``HF_TOKEN`` or the saved login.
        commit_message: default ``"headstart: <strategy> on <backbone>"``.
        dataset: the hub dataset id to name in the card's metadata; default the data folder's name.
        dry_run: write the card and return the list of files, without contacting the hub.

    Returns:
        The commit's URL (or, with ``dry_run``, the files that would be uploaded, comma-separated).
    """
    run = Path(run)
    repo_id, revision = split_ref(repo_id)
    if revision is not None:
        raise HubError(f"push writes the main branch; drop @{revision} from the repository id")
    info = read_model_info(run)
    if info.get("kind") != "classifier":
        raise ValueError(f"{run} holds a {info.get('kind')!r} model; push publishes trained classifiers")
    missing = [name for name in MODEL_FILES[:2] if not (run / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{run} lacks {', '.join(missing)}; is the run finished?")
    card = run / CARD
    if not card.is_file():
        atomic_write_bytes(card, model_card(run, repo_id, dataset).encode())
    files = [name for name in (*MODEL_FILES, CARD) if (run / name).is_file()]
    if dry_run:
        return ", ".join(files)
    with tempfile.TemporaryDirectory(prefix="headstart-push-") as stage:
        _stage(run, Path(stage), files)
        return _upload(Path(stage), repo_id, files, private, token, commit_message or f"headstart: {_title(info)}")


def _stage(run: Path, stage: Path, files: list[str]) -> None:
    """Copy what is uploaded, with this machine's paths cut to their last part in ``model.json`` and
    ``config.yaml`` (data folder, weights file, output and cache folders): they say where the files were here, which
    the hub's readers need not know, and a reader's copy never reads them back."""
    import yaml

    for name in files:
        if name == "model.json":
            (stage / name).write_text(json.dumps(_local_paths_cut(json.loads((run / name).read_text())), indent=2))
        elif name == "config.yaml":
            cut = _local_paths_cut(yaml.safe_load((run / name).read_text()))
            (stage / name).write_text(yaml.safe_dump(cut, sort_keys=False))
        else:
            shutil.copy2(run / name, stage / name)


def _local_paths_cut(value: Any) -> Any:
    """``value`` with every absolute local path (also as ``file:PATH``) replaced by its last part."""
    if isinstance(value, dict):
        return {k: _local_paths_cut(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_local_paths_cut(v) for v in value]
    if isinstance(value, str):
        prefix, path = ("file:", value[5:]) if value.startswith("file:") else ("", value)
        if PurePosixPath(path).is_absolute() or PureWindowsPath(path).drive or path.startswith("~"):
            return prefix + PureWindowsPath(path).name  # a Windows path reads both separators
    return value


def _upload(run: Path, repo_id: str, files: list[str], private: bool, token: str | None, message: str) -> str:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(token=token, library_name="headstart")
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(folder_path=run, repo_id=repo_id, allow_patterns=files, commit_message=message)
    except HfHubHTTPError as error:  # 401/403: no or wrong token; 404: no such organisation
        raise HubError(
            f"the hub refused the upload to {repo_id}: {str(error).splitlines()[0]}. Log in with `hf auth login` "
            "(or set HF_TOKEN) with write access to that namespace"
        ) from error
    except (TypeError, AttributeError, KeyError, ValueError):  # a bad value or a bug: as it is (ValueError: the CLI's)
        raise
    except Exception as error:  # no network or HF_HUB_OFFLINE=1: the HTTP client's own types, which vary by version
        if type(error).__name__ == "LocalTokenNotFoundError":
            raise HubError("pushing needs a hub token: log in with `hf auth login`, or set HF_TOKEN") from error
        raise offline_error(repo_id, error, pushing=True) from error
    progress.log(f"pushed {', '.join(files)} to {repo_id}")
    return str(commit)


def _title(info: dict[str, Any]) -> str:
    return f"{info.get('strategy', 'model')} on {info['backbone']}"


def model_card(run: str | Path, repo_id: str, dataset: str | None = None) -> str:
    """The model card of a run: YAML metadata (library, tags, datasets, metrics, results), then a readable body.

    Args:
        run: run folder.
        repo_id: the repository the card is for (named in its usage examples).
        dataset: hub dataset id for the metadata; default the data folder's name.
    """
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    run = Path(run)
    info = read_model_info(run)
    metrics_path = run / "metrics.json"
    details = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    data_name = dataset or Path(str(info.get("data_path") or info.get("config", {}).get("data", {}).get("path") or
                                    "data")).name  # fmt: skip
    val = info.get("val_metrics") or {}
    scores = [(key, float(val[key])) for key in ("accuracy", "balanced_accuracy", "roc_auc") if key in val]
    results = [
        EvalResult(task_type="image-classification", dataset_type=data_name, dataset_name=data_name,
                   dataset_split="validation", metric_type=key, metric_value=round(value, 4))
        for key, value in scores
    ]  # fmt: skip
    data = ModelCardData(
        library_name="headstart",
        pipeline_tag="image-classification",
        tags=[*TAGS, str(info.get("strategy", "")), _family(str(info["backbone"]))],
        datasets=[data_name],
        metrics=[key for key, _ in scores],
        base_model=_base_model(info),
        model_name=repo_id.split("/")[-1],
        eval_results=results or None,
    )
    body = _card_body(info, details, repo_id, data_name)
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}"))


def _family(backbone: str) -> str:
    """The library the backbone comes from, as a tag."""
    if backbone.startswith("torchvision/") or backbone == "googlenet":
        return "torchvision"
    if backbone == "tiny_cnn" or backbone.startswith(("ae:", "run:")):
        return "headstart"
    return "ensemble" if "+" in backbone else "timm"


def _base_model(info: dict[str, Any]) -> str | None:
    """The hub repository of the pretrained weights, when they came from one (the hub links the two)."""
    source = str(info.get("weights_source", ""))
    repo = source.removeprefix("hub:").partition("@")[0]
    if source.startswith("hub:") and repo.count("/") == 1 and not repo.startswith("torchvision/"):
        return repo
    return None


def _card_body(info: dict[str, Any], details: dict[str, Any], repo_id: str, data_name: str) -> str:
    prep = info["preprocessing"]
    classes = list(info["classes"])
    strategy = str(info.get("strategy", ""))
    lines = [
        f"# {repo_id.split('/')[-1]}",
        "",
        f"An image classifier for {len(classes)} classes ({_list(classes)}), trained with "
        f"[headstart](https://pypi.org/project/headstart/): {_STRATEGY.get(strategy, strategy)}, on "
        f"`{info['backbone']}`.",
        "",
        "## Model",
        "",
        f"* Backbone: `{info['backbone']}` ({info.get('num_features')} features); pretrained weights: "
        f"`{_weights(info)}`",
        f"* Strategy: `{strategy}`; head: {info.get('head', {}).get('type', 'linear')}",
    ]
    if info.get("recipe"):
        lines.append(f"* Recipe: {info['recipe']}")
    lines += ["", *_data_section(info, data_name), "", *_preprocessing_section(prep), ""]
    lines += [*_metrics_section(info, details), "", *_use_section(repo_id, classes), ""]
    versions = info.get("versions", {})
    lines += ["## Versions", "", ", ".join(f"{k} {v}" for k, v in versions.items()) or "not recorded", ""]
    return "\n".join(lines)


def _weights(info: dict[str, Any]) -> str:
    """The weights' origin without a local path (a file's name only: the card is public)."""
    source = str(info.get("weights_source", "random"))
    kind, _, where = source.partition(":")
    return f"file:{Path(where).name}" if kind == "file" else source


def _list(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(f"`{n}`" for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _data_section(info: dict[str, Any], data_name: str) -> list[str]:
    train, val = info.get("train_counts") or {}, info.get("val_counts") or {}
    lines = ["## Data", "", f"Trained on `{data_name}`: {sum(train.values())} training and {sum(val.values())} "
             f"validation images (data fingerprint `{info.get('data_fingerprint', 'not recorded')}`).", ""]  # fmt: skip
    if train:
        lines += ["| class | training images | validation images |", "| --- | --- | --- |"]
        lines += [f"| {name} | {train.get(name, 0)} | {val.get(name, 0)} |" for name in info["classes"]]
    return lines


def _preprocessing_section(prep: dict[str, Any]) -> list[str]:
    mean = ", ".join(f"{v:g}" for v in prep["mean"])
    std = ", ".join(f"{v:g}" for v in prep["std"])
    return [
        "## Preprocessing",
        "",
        f"RGB; resize the shorter side to {prep['resize_size']} px ({prep['interpolation']}), centre-crop "
        f"{prep['input_size']} x {prep['input_size']}, scale to [0, 1], subtract mean ({mean}) and divide by std "
        f"({std}) per channel."
        + (" Features are averaged with the mirror image's." if prep.get("mirror") else "")
        + " `headstart predict` and `headstart export` apply it (it is stored in `model.json`).",
    ]


def _metrics_section(info: dict[str, Any], details: dict[str, Any]) -> list[str]:
    val = info.get("val_metrics") or {}
    lines = ["## Metrics", "", f"On the validation split ({val.get('n', '?')} images):", ""]
    lines += ["| metric | value |", "| --- | --- |"]
    lines += [f"| {key} | {float(val[key]):.4f} |" for key in ("accuracy", "balanced_accuracy", "roc_auc", "loss")
              if key in val]  # fmt: skip
    per_class = (details.get("val") or {}).get("per_class") or {}
    if per_class:
        lines += ["", "| class | precision | recall | F1 | support |", "| --- | --- | --- | --- | --- |"]
        lines += [f"| {name} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | {m['support']} |"
                  for name, m in per_class.items()]  # fmt: skip
    if info.get("test_metrics"):
        lines += ["", f"Test split: accuracy {float(info['test_metrics'].get('accuracy', 0)):.4f}."]
    return lines


def _use_section(repo_id: str, classes: list[str]) -> list[str]:
    return [
        "## Intended use and limitations",
        "",
        f"Sorting images into the {len(classes)} classes above, for images like the training set's. Every image gets "
        "one of these classes, even one that shows none of them: check the probabilities, and measure accuracy on "
        "your own images before relying on it. The metrics come from a small validation split of the same source as "
        "the training images; accuracy drops on images from other cameras, sites or populations. The pretrained "
        "backbone's licence and known biases carry over to this model.",
        "",
        "## How to use",
        "",
        "```bash",
        "pip install headstart",
        f"headstart pull {repo_id} --out model",
        "headstart predict model photo.jpg --top-k 3",
        "headstart export model --format onnx",
        "```",
        "",
        "```python",
        "import headstart",
        f'model = headstart.load("hf-hub:{repo_id}")',
        'predictions, unreadable = model.predict(["photo.jpg"], top_k=3)',
        "```",
        "",
        "Loading reads `model.safetensors` and `model.json`; it runs no code from the repository.",
    ]
