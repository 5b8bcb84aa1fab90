"""The Python API: ``train`` a classifier by any strategy, ``load`` it back, ``predict`` and ``evaluate``.

The CLI calls these functions and nothing else.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader

from headstart import config as cfg
from headstart import progress
from headstart.config import TrainConfig
from headstart.data.scan import Dataset, ImageRecord, load_dataset
from headstart.data.transforms import (
    FileDataset,
    MemoryDataset,
    Preprocessing,
    collate_skip,
    decode_all,
    estimated_bytes,
    train_augment,
    tta_views,
)
from headstart.errors import ConfigError
from headstart.features.embeddings import Embeddings, embed
from headstart.files import atomic_write_bytes, default_cache_root, new_run_dir
from headstart.hardware import decode_workers, launch_rank, pick_device, resolve_precision, single_process
from headstart.insight.audit import quick_audit
from headstart.insight.metrics import classification_metrics, multilabel_metrics
from headstart.insight.predictor import load
from headstart.models.backbones import Backbone, create_backbone, ensemble_members
from headstart.models.classifier import (
    Classifier,
    classifier_tensors,
    read_model_info,
    save_classifier,
    write_classifier,
    write_model_info,
)
from headstart.models.heads import (
    choose_threshold,
    fit_knn,
    fit_logistic,
    fit_one_vs_rest,
    predict_proba,
    predict_sigmoid,
)
from headstart.models.prepared import PreparedBackbone, load_backbone
from headstart.training.objectives import Classification, MultiLabel
from headstart.training.strategies import (
    FROZEN,
    apply_bn_policy,
    param_groups,
    resolve_model,
    resolve_optim,
    resolve_preprocessing,
)
from headstart.training.tracking import Tracking, check_tracker, guarded, tracking_accelerator
from headstart.training.trainer import EpochSampler, LoopSettings, Trainer, make_accelerator

# Short keyword names accepted by train() besides dotted config keys.
ALIASES = {
    "backbone": "model.backbone",
    "weights": "model.weights",
    "input_size": "model.input_size",
    "mirror": "model.mirror",
    "crops": "model.crops",
    "epochs": "optim.epochs",
    "lr": "optim.lr",
    "head": "optim.head",
    "augment_views": "optim.augment_views",
    "head_scaling": "optim.head_scaling",
    "bn_policy": "optim.bn_policy",
    "out": "run.out",
    "overwrite": "run.overwrite",
    "seed": "run.seed",
    "deterministic": "run.deterministic",
    "precision": "run.precision",
    "class_weights": "run.class_weights",
    "early_stopping": "run.early_stopping",
    "cache_dir": "run.cache_dir",
    "log_with": "run.log_with",
    "tracking_dir": "run.tracking_dir",
    "val_fraction": "data.val_fraction",
    "split_seed": "data.split_seed",
    "batch_size": "data.batch_size",
    "num_workers": "data.num_workers",
    "multi_label": "data.multi_label",
}
# The headline metrics model.json keeps; multi-label runs have mAP, exact_match, macro_f1 and hamming_loss instead of
# accuracy, balanced_accuracy and roc_auc.
SUMMARY_KEYS = ("n", "accuracy", "balanced_accuracy", "roc_auc", "mAP", "exact_match", "macro_f1", "hamming_loss",
                "loss")  # fmt: skip


@dataclass
class TrainResult:
    """What ``train`` returns."""

    run_dir: Path
    metrics: dict[str, Any]  # validation metrics of the saved (best) model, measured through the predict path
    seconds: float  # wall time of the whole job
    config: TrainConfig
    history: list[dict[str, Any]] = field(default_factory=list)
    test_metrics: dict[str, Any] | None = None
    # The final (last-epoch) model in memory; the run folder holds the best one. None for an extract run served
    # entirely from the caches: it never built the network (``load(run_dir)`` does).
    model: Classifier | None = None

    def _repr_html_(self) -> str:
        """Scores, confusion matrix and learning curves, shown by Jupyter."""
        from headstart.insight.notebook import train_view

        return train_view(self)


def build_config(data: str | Path | None = None, config: TrainConfig | None = None, **overrides: Any) -> TrainConfig:
    """A config from a base (default: ``TrainConfig()``), the data path, and keyword overrides.

    Keywords are dotted config keys (``"optim.lr"``) or the short names in :data:`ALIASES`; ``strategy`` too.
    """
    base = config or TrainConfig()
    changes: dict[str, Any] = {}
    for key, value in overrides.items():
        if value is None:
            continue
        dotted = ALIASES.get(key, key.replace("__", "."))
        head, _, rest = dotted.partition(".")
        if head != "strategy" and not rest:
            raise TypeError(f"unknown option {key!r}; use one of {', '.join(sorted(ALIASES))} or a dotted key")
        changes[dotted] = str(value) if isinstance(value, Path) else value  # configs hold plain YAML values
    if data is not None:
        changes["data.path"] = str(data)
    built = cfg.replace(base, **changes)
    if not built.data.path:
        raise ValueError("no data given: pass a dataset folder or CSV manifest")
    if built.strategy == "scratch" and built.model.weights:
        raise ValueError(
            f"--strategy scratch trains from random weights, but --weights {built.model.weights} was given; "
            "drop --weights, or use --strategy finetune to start from that file"
        )
    return built


def _seed_everything(seed: int, deterministic: bool) -> None:
    set_seed(seed, deterministic=deterministic)
    random.seed(seed)
    np.random.seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


def _summary(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: metrics[k] for k in SUMMARY_KEYS if k in metrics}


def resume(run: str | Path) -> TrainResult:
    """Continue a killed or interrupted run from ``RUN/checkpoints/last.pt`` with the run's own ``config.yaml``."""
    run = Path(run)
    if not (run / "config.yaml").is_file():
        raise FileNotFoundError(f"{run / 'config.yaml'} not found; is {run} a headstart run folder?")
    config = cfg.load_yaml(TrainConfig, run / "config.yaml")
    if config.strategy in FROZEN:
        raise ValueError(
            f"{run} is a {config.strategy} run on frozen features: it has no checkpoints to resume; it takes seconds "
            "to run again"
        )
    return train(config=cfg.replace(config, **{"run.out": str(run)}), _resume=True)


def train(
    data: str | Path | None = None, *, config: TrainConfig | None = None, _resume: bool = False, **overrides: Any
) -> TrainResult:
    """Train a classifier on a folder of labelled images by one of the strategies (default ``auto``).

    Args:
        data: dataset folder or CSV manifest (or set ``config.data.path``).
        config: a full configuration; keyword overrides apply on top.
        _resume: continue from the run folder's last checkpoint (use :func:`resume`).
        **overrides: e.g. ``strategy="extract"``, ``backbone="resnet50"``, ``epochs=3``, ``out="runs/x"``.

    Returns:
        The run folder, the saved model's validation metrics and the wall time.
    """
    tic = time.perf_counter()
    config = resolve_config(build_config(data, config, **overrides))
    # Only network training needs Accelerate (DDP); extract runs its single pass without it. With split_batches,
    # data.batch_size is the global batch whatever the number of processes, so the learning rate needs no rescaling.
    check_tracker(config.run.log_with)  # a tracker that is not installed fails here, before anything trains
    accelerator = make_accelerator(config.run.log_with) if config.strategy not in FROZEN else None
    is_main = accelerator.is_main_process if accelerator else launch_rank() == 0
    device = accelerator.device if accelerator else pick_device()
    precision = resolve_precision(config.run.precision, device)
    _seed_everything(config.run.seed, config.run.deterministic)
    name = f"{config.strategy}-{config.model.backbone}"  # of the default run folder
    run_dir = Path(str(config.run.out)) if _resume else new_run_dir(config.run.out, name, config.run.overwrite, is_main)
    cache_root = default_cache_root(config.run.cache_dir)
    dataset = _load_data(config, run_dir, cache_root, is_main)
    backbone = _backbone(config, cache_root)
    if is_main and not _resume:
        cfg.save_yaml(config, run_dir / "config.yaml")
    meta = _meta(config, dataset, precision)
    result = TrainResult(run_dir, {}, 0.0, config)
    tracking = start_tracking(config, run_dir, accelerator) if is_main else None
    head, baseline = None, None
    if config.strategy != "scratch" and not _resume:  # a resumed run's head is in its checkpoint
        # Under a multi-process launch every rank embeds its share of the images; each then fits the (same) head.
        head, baseline = _fit_head(backbone, dataset, config, precision, device, is_main)
    if dataset.multi_label:  # the head's cross-validated thresholds (0.5 before a network has any), kept in model.json
        chosen = baseline["head_info"]["thresholds"] if baseline is not None else {}
        meta["thresholds"] = {name: float(chosen.get(name, 0.5)) for name in dataset.classes}
    if not is_main and accelerator is None:
        return result  # frozen features: rank 0 writes the run folder
    if config.strategy in FROZEN and head is not None and baseline is not None:
        _save_frozen(result, backbone, head, baseline, meta)
    if accelerator is not None:
        assert isinstance(backbone, Backbone)  # finetune and scratch build theirs
        result.model = Classifier(backbone, len(dataset.classes), config.model.drop_rate, head=head)

        def on_best(best: torch.nn.Module, metrics: dict[str, Any]) -> None:
            assert isinstance(best, Classifier)
            save_classifier(best, run_dir, {**meta, "val_metrics": _summary(metrics)})

        result.history = _fit_network(
            result.model, dataset, config, precision, accelerator, run_dir, on_best, baseline, _resume, tracking
        )
        accelerator.wait_for_everyone()
        if not is_main:
            return result  # the shared work is done; rank 0 alone evaluates, writes and reports
    with single_process():  # rank 0 alone from here: no feature pass may wait for ranks that have left
        _finish_run(result, dataset, run_dir, reload=accelerator is not None, started=tic)
        result.seconds = time.perf_counter() - tic  # the report below is not part of the training cost
        if config.run.report:
            _write_report(run_dir, dataset)
        if tracking is not None:
            finish_tracking(tracking, result)
    return result


def resolve_config(config: TrainConfig) -> TrainConfig:
    """Fill every choice left to the strategy (backbone, mirror, optimiser settings): what config.yaml records."""
    return cfg.replace(
        config, optim=resolve_optim(config.strategy, config.optim), model=resolve_model(config.strategy, config.model)
    )


def start_tracking(config: TrainConfig, run_dir: Path, accelerator: Accelerator | None) -> Tracking | None:
    """Open the tracker of ``run.log_with`` (None without one) and log the resolved config as hyperparameters."""
    name = config.run.log_with
    if name is None:
        return None
    folder = (Path(config.run.tracking_dir) if config.run.tracking_dir else run_dir / "tracking").resolve()
    accelerator = accelerator or tracking_accelerator(name, folder)
    accelerator.project_configuration.set_directories(str(folder))
    tracking = Tracking(accelerator, name, folder)
    guarded("start", tracking.start, run_dir.name, cfg.to_dict(config))
    progress.log(f"tracking with {name} in {folder}")
    return tracking


def finish_tracking(tracking: Tracking, result: TrainResult) -> None:
    """Log what the epochs did not: the head fitted on frozen features (epoch 0; all of an extract run), the saved
    model's final metrics, and the report's figures; then close the tracker."""
    from headstart.insight.report import FIGURES

    last = int(result.history[-1]["epoch"]) if result.history else 0
    for row in result.history[:1]:
        if row["epoch"] == 0:  # the head on frozen features (an extract run's only row), never an epoch's
            guarded("log", tracking.log, row, 0)
    guarded("log", tracking.log, _summary(result.metrics), last, "final/")
    if result.test_metrics:
        guarded("log", tracking.log, _summary(result.test_metrics), last, "test/")
    guarded("figures", tracking.figures, result.run_dir / FIGURES, last)
    guarded("end", tracking.end)


def _load_data(config: TrainConfig, run_dir: Path, cache_root: Path, is_main: bool) -> Dataset:
    """Scan and split the data, list what was skipped, and warn about leakage (rank 0 reports)."""
    dataset = load_dataset(
        config.data.path, config.data.val_fraction, config.data.split_seed, cache_root, config.data.multi_label
    )
    _report_data(dataset, run_dir, is_main)
    if config.run.audit and is_main:
        for warning in quick_audit(dataset):
            progress.log(f"[yellow]{warning}")
    return dataset


def _backbone(config: TrainConfig, cache_root: Path) -> Backbone | PreparedBackbone:
    """The strategy's backbone with its preprocessing; frozen strategies get the stored description, which builds no
    network when every feature is in the cache."""
    assert config.model.backbone is not None  # resolve_config chose one
    backbone: Backbone | PreparedBackbone
    if config.strategy in FROZEN:
        backbone = load_backbone(config.model.backbone, config.model.weights, cache_root)
    else:
        backbone = create_backbone(
            config.model.backbone, pretrained=config.strategy != "scratch", weights=config.model.weights
        )
    backbone.preprocessing = resolve_preprocessing(
        config.strategy,
        backbone.preprocessing,
        config.model.input_size,
        bool(config.model.mirror),
        bool(config.model.crops),
    )
    return backbone


def _meta(config: TrainConfig, dataset: Dataset, precision: str) -> dict[str, Any]:
    """What model.json records about the run besides the model itself (a multi-label run: ``multi_label``, and
    ``thresholds`` once chosen)."""
    return {
        **({"multi_label": True} if dataset.multi_label else {}),
        "classes": dataset.classes,
        "strategy": config.strategy,
        "precision": precision,
        "data_fingerprint": dataset.fingerprint(),
        "data_path": str(dataset.root),
        "config": cfg.to_dict(config),
        "train_counts": dataset.counts(dataset.train),
        "val_counts": dataset.counts(dataset.val),
    }


def _save_frozen(
    result: TrainResult, backbone: Backbone | PreparedBackbone, head: torch.nn.Module, baseline: dict[str, Any],
    meta: dict[str, Any],
) -> None:  # fmt: skip
    """Write the model of a frozen-feature run (backbone tensors + the fitted head) and its one metrics row."""
    config, run_dir = result.config, result.run_dir
    num_classes = len(meta["classes"])
    info = baseline.pop("head_info")
    tensors = classifier_tensors(backbone.state_dict(), head)
    # frozen_backbone: the saved backbone is the pretrained one, so loading can serve its features from the cache
    summary = {**meta, "val_metrics": _summary(baseline), "recipe": info.get("recipe"), "frozen_backbone": True}
    write_classifier(run_dir, backbone, tensors, head, num_classes, config.model.drop_rate, summary)
    network = backbone if isinstance(backbone, Backbone) else backbone.built
    if network is not None:
        result.model = Classifier(network, num_classes, config.model.drop_rate, head=head)
        result.model.freeze_backbone()
    entry = {"epoch": 0, "phase": "head", **_summary(baseline), **info}
    atomic_write_bytes(run_dir / "metrics.jsonl", (json.dumps(entry) + "\n").encode(), sync=False)
    result.history = [entry]
    # The model's head runs in fp32 on the same features, so these are the saved model's own metrics.
    result.metrics = baseline


def _finish_run(result: TrainResult, dataset: Dataset, run_dir: Path, reload: bool, started: float) -> None:
    """Measure the saved (best) model through the ``evaluate`` path and complete model.json and metrics.json."""
    # The best checkpoint, measured through the same path as `headstart evaluate`. An extract run's val metrics
    # already are its saved model's, so without a test split it skips rebuilding the network.
    loaded = load(run_dir) if reload or dataset.test else None
    if loaded is not None and reload and dataset.multi_label:
        loaded.info["thresholds"] = _training_thresholds(loaded, dataset)
    if loaded is not None and reload:
        result.metrics = loaded.evaluate(dataset, split="val")
    if loaded is not None and dataset.test:
        result.test_metrics = loaded.evaluate(dataset, split="test")
    info = loaded.info if loaded is not None else read_model_info(run_dir)
    info["val_metrics"] = _summary(result.metrics)
    info["test_metrics"] = _summary(result.test_metrics) if result.test_metrics else None
    info["train_seconds"] = round(time.perf_counter() - started, 2)
    write_model_info(run_dir, info)
    metrics = {"val": result.metrics, "test": result.test_metrics}
    atomic_write_bytes(run_dir / "metrics.json", json.dumps(metrics, indent=2).encode(), sync=False)


def _training_thresholds(model: Any, dataset: Dataset) -> dict[str, float]:
    """Per-label thresholds of a trained network (finetune, scratch): those maximising F1 of its predictions on the
    training split's centre crops. Out-of-fold predictions would need a network per fold; the head phase's
    cross-validated thresholds belong to the frozen-feature head, not to the network trained after it."""
    probs, out = model.predict_proba(dataset.train)
    targets = dataset.targets(dataset.train)[out.ok]
    return {name: choose_threshold(probs[:, j], targets[:, j]) for j, name in enumerate(dataset.classes)}


def _write_report(run_dir: Path, dataset: Dataset) -> None:
    """Build report.html; the model is already saved, so a failing figure must not fail the run."""
    from headstart.insight.report import build_report

    try:
        build_report(run_dir, data=dataset)
    except Exception as error:  # reporting is best effort: matplotlib, Grad-CAM and t-SNE each have failure modes
        progress.log(f"[yellow]report not written ({type(error).__name__}: {error}); retry with `headstart report`")


def _report_data(dataset: Dataset, run_dir: Path, is_main: bool) -> None:
    if not is_main:
        return
    dataset.write_skipped(run_dir / "skipped_files.txt")
    counts = ", ".join(f"{k} {v}" for k, v in dataset.counts(dataset.train).items())
    progress.log(
        f"data: {len(dataset.classes)} classes, {len(dataset.train)} train ({counts}), {len(dataset.val)} val"
        + (f", {len(dataset.test)} test" if dataset.test else "")
    )
    if dataset.skipped:
        progress.log(f"[yellow]skipped {len(dataset.skipped)} file(s), listed in {run_dir / 'skipped_files.txt'}:")
        for item in dataset.skipped[:10]:
            progress.log(f"  {item.path}: {item.reason}")


def _class_weights(dataset: Dataset, mode: str) -> tuple[float, ...] | None:
    """Inverse class frequency (multi-label: each label's absent / present images, BCE's ``pos_weight``)."""
    if mode != "auto":
        return None
    if dataset.multi_label:
        present = dataset.targets(dataset.train).sum(0)
        return tuple(float(w) for w in (len(dataset.train) - present) / np.maximum(present, 1))
    counts = np.array(list(dataset.counts(dataset.train).values()), dtype=np.float64)
    weights = counts.sum() / (len(counts) * np.maximum(counts, 1))
    return tuple(float(w) for w in weights)


def _fit_head(
    backbone: Backbone | PreparedBackbone, dataset: Dataset, config: TrainConfig, precision: str, device: torch.device,
    show: bool,
) -> tuple[torch.nn.Module, dict[str, Any]]:  # fmt: skip
    """Train a new head on cached frozen features; returns it and its validation metrics (epoch 0), whose
    ``head_info`` says what was chosen (``recipe``: one readable line)."""
    optim = config.optim
    train_set, val_set, hits = _head_features(backbone, dataset, config, precision, device)
    features, labels, groups = train_set
    class_weight = "balanced" if config.run.class_weights == "auto" else None
    tic = time.perf_counter()
    info: dict[str, Any]
    head: torch.nn.Module
    num_classes = len(dataset.classes)
    if dataset.multi_label:
        return _fit_multilabel_head(backbone, dataset, config, (features, labels, groups), val_set, hits, show)
    if optim.head == "knn":
        head = fit_knn(features, labels, num_classes, k=optim.knn_k or 10)
        info = {"head": "knn", "k": optim.knn_k}
    else:
        head, fitted = fit_logistic(
            features, labels, num_classes, c=optim.head_c, class_weight=class_weight, seed=config.run.seed,
            groups=groups, scaling=optim.head_scaling or "feature",
        )  # fmt: skip
        info = {"head": "logistic", **fitted}
    info["head_seconds"] = round(time.perf_counter() - tic, 3)
    info["feature_cache_hits"] = hits
    info["recipe"] = recipe_line(config, backbone, info)
    val_features, val_labels = val_set
    probs = predict_proba(head, val_features)
    metrics = classification_metrics(val_labels, probs, dataset.classes)
    metrics["loss"] = float(-np.log(np.clip(probs[np.arange(len(val_labels)), val_labels], 1e-12, 1.0)).mean())
    metrics["head_info"] = info
    if show:
        progress.log(f"recipe: {info['recipe']}")
        progress.log(f"head on frozen features: val accuracy {metrics['accuracy']:.4f} ({hits} images from the cache)")
    return head, metrics


def _fit_multilabel_head(
    backbone: Backbone | PreparedBackbone, dataset: Dataset, config: TrainConfig,
    train_set: tuple[np.ndarray, np.ndarray, np.ndarray], val_set: tuple[np.ndarray, np.ndarray], hits: int, show: bool,
) -> tuple[torch.nn.Module, dict[str, Any]]:  # fmt: skip
    """:func:`_fit_head` for multi-label data: one-vs-rest logistic heads and their cross-validated thresholds."""
    if config.optim.head == "knn":
        raise ConfigError("the kNN head votes for one class per image; a multi-label run needs the logistic head: "
                          "drop --head knn")  # fmt: skip
    features, targets, groups = train_set
    tic = time.perf_counter()
    class_weight = "balanced" if config.run.class_weights == "auto" else None
    head, fitted, thresholds = fit_one_vs_rest(
        features, targets, c=config.optim.head_c, class_weight=class_weight, seed=config.run.seed, groups=groups,
        scaling=config.optim.head_scaling or "feature", names=dataset.classes,
    )  # fmt: skip
    info: dict[str, Any] = {"head": "logistic", "multi_label": True, **fitted}
    info["head_seconds"] = round(time.perf_counter() - tic, 3)
    info["feature_cache_hits"] = hits
    info["recipe"] = recipe_line(config, backbone, info)
    val_features, val_targets = val_set
    metrics = multilabel_metrics(val_targets, predict_sigmoid(head, val_features), dataset.classes, thresholds)
    metrics["head_info"] = info
    if show:
        progress.log(f"recipe: {info['recipe']}")
        progress.log(f"head on frozen features: val mAP {metrics['mAP']:.4f}, exact match {metrics['exact_match']:.4f} "
                     f"({hits} images from the cache)")  # fmt: skip
    return head, metrics


def _head_features(
    backbone: Backbone | PreparedBackbone, dataset: Dataset, config: TrainConfig, precision: str, device: torch.device
) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray], int]:
    """((train features, labels, image of each row), (val features, labels), images served by the feature cache);
    training rows include ``optim.augment_views`` augmented views of each image."""
    common: dict[str, Any] = {
        "batch_size": config.data.batch_size,
        "precision": precision,
        "device": device,
        "cache_root": default_cache_root(config.run.cache_dir),
        "workers": config.data.num_workers,
        "channels_last": config.run.channels_last,
    }
    both = _view_features(backbone, dataset.train + dataset.val, common)
    n_train = len(dataset.train)
    in_train = both.index < n_train
    tr = Embeddings(both.features[in_train], both.index[in_train])
    va = Embeddings(both.features[~in_train], both.index[~in_train] - n_train)
    labels = _row_labels(dataset, dataset.train, tr.index)
    features, groups = tr.features, tr.index.copy()
    for k in range(config.optim.augment_views or 0):
        torch.manual_seed(config.run.seed * 1000 + k)
        view = embed(
            backbone,
            [dataset.train[i] for i in tr.index],
            view=f"aug-light-s{config.run.seed}-{k}",
            augment=train_augment(backbone.preprocessing, "light"),
            description=f"features (view {k + 1})",
            **common,
        )
        features = np.concatenate([features, view.features])
        labels = np.concatenate([labels, _row_labels(dataset, dataset.train, tr.index[view.index])])
        groups = np.concatenate([groups, tr.index[view.index]])
    val_labels = _row_labels(dataset, dataset.val, va.index)
    return (features, labels, groups), (va.features, val_labels), both.hits


def _view_features(
    backbone: Backbone | PreparedBackbone, records: list[ImageRecord], common: dict[str, Any]
) -> Embeddings:
    """Features of ``records``: the centre view, or with ``preprocessing.crops`` the mean over the views of TTA
    ``crops``, each from its own cache folder (the ones predicting with ``--tta crops`` reads). A linear head on the
    mean of the views' features gives the mean of their logits, which is what prediction averages."""
    _, views = tta_views(None, backbone.preprocessing)
    if len(views) == 1:
        return embed(backbone, records, description="features", **common)
    parts = [
        embed(backbone, records, view=name, augment=augment, description=f"features ({name})", **common)
        for name, augment in views
    ]
    ok = np.logical_and.reduce([np.isin(np.arange(len(records)), p.index) for p in parts])
    index = np.flatnonzero(ok)
    mean = np.stack([p.features[np.isin(p.index, index)] for p in parts]).mean(axis=0, dtype=np.float64)
    failed = sorted({f for p in parts for f in p.failed})
    return Embeddings(mean.astype(np.float32), index, failed, hits=min(p.hits for p in parts))


def frozen_features(
    config: TrainConfig, dataset: Dataset
) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray], int]:
    """The features a frozen-feature run of the resolved ``config`` fits its head on (:func:`_head_features`), built by
    the same path as ``train``: the learning curve and the benchmarks describe what ``train`` would give."""
    if config.strategy not in FROZEN:
        raise ValueError(f"frozen features come from the {' or '.join(FROZEN)} strategy, not {config.strategy}")
    device = pick_device()
    precision = resolve_precision(config.run.precision, device)
    backbone = _backbone(config, default_cache_root(config.run.cache_dir))
    return _head_features(backbone, dataset, config, precision, device)


def _row_labels(dataset: Dataset, records: list[Any], index: np.ndarray) -> np.ndarray:
    """Labels of ``records[index]``: class indices [N], or multi-hot rows [N, L] for multi-label data."""
    if dataset.multi_label:
        return dataset.targets(records)[index]
    return np.array([records[i].label for i in index], dtype=np.int64)


def _scaling(info: dict[str, Any]) -> str:
    """The head's feature scaling in words: ``feature`` is per-feature standardisation, ``global`` one scale."""
    scaling = info.get("scaling")
    return {"feature": "per-feature scaling", "global": "one global scale"}.get(str(scaling), f"{scaling} scaling")


def recipe_line(config: TrainConfig, backbone: Backbone | PreparedBackbone, info: dict[str, Any]) -> str:
    """One readable line: what the frozen-feature recipe decided, and why."""
    prep = backbone.preprocessing
    if config.model.input_size:
        size = "given"
    elif len(ensemble_members(backbone.name)) > 1:
        size = "the largest member's own size; each member sees the crop resized to its own"
    else:
        size = "the weights' own size"
    views = "each image's features averaged with its mirror image's" if prep.mirror else "one centre view"
    if prep.crops:
        views = "features averaged over the centre and four corner crops" + (", each with its mirror" * prep.mirror)
    if info.get("multi_label"):
        strengths = ", ".join(f"{name} {c}" for name, c in info["C"].items())
        cuts = ", ".join(f"{name} {t:.3f}" for name, t in info["thresholds"].items())
        head = (f"one-vs-rest logistic heads, {_scaling(info)}, C per label ({strengths}), "
                f"F1-maximising thresholds ({cuts}) from out-of-fold probabilities on the training split")  # fmt: skip
        head += f" (fixed C and threshold 0.5: {info['cv_skipped']})" if "cv_skipped" in info else ""
    elif info.get("head") == "knn":
        head = f"kNN head, k={info.get('k')}"
    else:
        head = f"logistic head, C={info.get('C')}, {_scaling(info)}"
        if "cv_skipped" in info:  # nothing could be cross-validated: say what was fixed instead, and why
            head += f" (fixed: {info['cv_skipped']}, so cross-validation could not choose)"
        else:  # what cross-validation on the training split chose (the rest was set beforehand)
            chosen = ["C"] if config.optim.head_c is None else []
            chosen += ["the feature scaling"] if config.optim.head_scaling == "auto" else []
            head += f"; {' and '.join(chosen)} chosen by cross-validation on the training split" if chosen else ""
            head += f" (CV accuracy {info['cv_accuracy']:.3f})" if "cv_accuracy" in info else ""
    return (
        f"{config.strategy}: frozen {backbone.name} features ({backbone.num_features}) at {prep.input_size} px "
        f"({size}), {views}; {head}"
    )


def _fit_network(
    model: Classifier,
    dataset: Dataset,
    config: TrainConfig,
    precision: str,
    accelerator: Accelerator,
    run_dir: Path,
    on_best: Any,
    baseline: dict[str, Any] | None,
    resume: bool = False,
    tracking: Tracking | None = None,
) -> list[dict[str, Any]]:
    """Train the whole network (finetune phase 2, or scratch) with the shared trainer.

    Every parameter trains from the first step of this phase (the finetune head phase ran before, on cached
    features), so no ``requires_grad`` flips mid-run: safe under DDP and across resumes.
    """
    optim = config.optim
    assert optim.epochs is not None and optim.warmup_epochs is not None and optim.label_smoothing is not None
    apply_bn_policy(model, optim.bn_policy or "train")
    if accelerator.num_processes > 1 and not model.frozen_bn and accelerator.device.type == "cuda":
        # Per-process batches are small; synchronised statistics behave like the single-process global batch.
        # (SyncBatchNorm runs on GPUs only; on CPU processes each keep their own batch statistics.)
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    prep = model.backbone.preprocessing
    train_loader, val_loader = make_loaders(dataset, prep, config)
    settings = LoopSettings(
        epochs=optim.epochs,
        warmup_epochs=optim.warmup_epochs,
        metric=config.run.metric,
        early_stopping=config.run.early_stopping,
        precision=precision,
        channels_last=config.run.channels_last,
        checkpoint_every=config.run.checkpoint_every,
        compile=config.run.compile,
    )
    if config.run.channels_last:
        model.to(memory_format=torch.channels_last)
    objective: Classification | MultiLabel
    if dataset.multi_label:  # selected by macro mAP, which needs no threshold
        settings = dataclasses.replace(settings, metric="mAP")
        thresholds = [float((baseline or {}).get("per_class", {}).get(c, {}).get("threshold", 0.5))
                      for c in dataset.classes]  # fmt: skip
        objective = MultiLabel(dataset.classes, prep, dataset.targets(dataset.train), dataset.targets(dataset.val),
                               thresholds, optim.label_smoothing, _class_weights(dataset, config.run.class_weights),
                               accelerator.device)  # fmt: skip
    else:
        objective = Classification(dataset.classes, prep, optim.label_smoothing,
                                   _class_weights(dataset, config.run.class_weights), accelerator.device)  # fmt: skip
    trainer = Trainer(
        model,
        param_groups(model, config.strategy, optim),
        train_loader,
        val_loader,
        settings,
        objective,
        on_best=on_best,
        run_dir=run_dir,
        accelerator=accelerator,
        baseline=baseline,
        on_epoch=None if tracking is None else lambda _, row: guarded("log", tracking.log, row, row["epoch"]),
    )
    result = trainer.fit(resume=resume)
    if accelerator.is_main_process:
        progress.log(f"best val {settings.metric} {result.best_metric:.4f} at epoch {result.best_epoch}")
    return result.history


def make_loaders(dataset: Dataset, prep: Preprocessing, config: TrainConfig) -> tuple[DataLoader[Any], DataLoader[Any]]:
    """Training loader (augmented) and validation loader (centre crops).

    Small sets are decoded once into memory and augmented from there; larger ones decode every epoch in workers.
    """
    augment = train_augment(prep, config.optim.augment or "light")
    budget = config.data.image_cache_mb * 2**20
    in_memory = config.data.cache_images and estimated_bytes(dataset.train + dataset.val, prep) <= budget
    train_set: torch.utils.data.Dataset[Any]
    val_set: torch.utils.data.Dataset[Any]
    if in_memory:
        labels = [r.label for r in dataset.train]
        train_set = MemoryDataset(decode_all(dataset.train, prep), labels, augment, seed=config.run.seed)
        val_set = MemoryDataset(decode_all(dataset.val, prep, crop=True), [r.label for r in dataset.val], None)
        workers = 0  # augmenting in-memory tensors costs less than shipping them between processes
    else:
        train_set = FileDataset(dataset.train, prep, augment, seed=config.run.seed)
        val_set = FileDataset(dataset.val, prep)
        workers = decode_workers(config.data.num_workers)
    batch = min(config.data.batch_size, len(dataset.train))
    train_loader = DataLoader(
        train_set,
        batch_size=batch,
        sampler=EpochSampler(len(train_set), config.run.seed),  # order depends on (seed, epoch) only: resumable
        drop_last=len(dataset.train) > batch,  # a last batch of one would break BatchNorm
        num_workers=workers,
        # Iterators draw worker seeds from this generator instead of the global RNG, which dropout uses: a resumed
        # run creates an extra iterator, and must not shift the dropout stream by doing so.
        generator=torch.Generator().manual_seed(config.run.seed),
        collate_fn=collate_skip,
        persistent_workers=workers > 0,
    )
    val_loader = DataLoader(
        val_set, batch_size=config.data.batch_size, num_workers=workers, collate_fn=collate_skip,
        persistent_workers=workers > 0, generator=torch.Generator().manual_seed(config.run.seed),
    )  # fmt: skip
    return train_loader, val_loader
