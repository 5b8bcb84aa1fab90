"""Trained models on the Hugging Face Hub: what a model repository holds, and fetching one.

A headstart model repository holds a run folder's model files at its top level (``model.safetensors``,
``model.json``, ``config.yaml``, ``metrics.json``) and a model card (``README.md``), so a downloaded copy *is* a run
folder: ``predict``, ``evaluate``, ``export`` and ``serve`` read it as they read one made by ``train``.
:func:`headstart.serving.hub.push` writes such a repository.

Downloads go through ``huggingface_hub`` as its users' do (``snapshot_download``): into its cache (``HF_HOME``,
``HF_HUB_CACHE``), from ``HF_ENDPOINT``, with ``HF_TOKEN`` for private repositories; offline (``HF_HUB_OFFLINE=1``
or no network) a model pulled before is served from the cache. Nothing downloaded is ever executed: the weights
are safetensors and the descriptions JSON and YAML.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Any

from headstart.errors import HeadstartError

# What a model repository holds, and all that pull fetches (a repository may hold more, such as figures).
MODEL_FILES = ("model.safetensors", "model.json", "config.yaml", "metrics.json")
CARD = "README.md"


class HubError(HeadstartError, OSError):
    """The hub cannot give what was asked: offline with nothing cached, no such repository or revision, no
    permission, or a repository that holds no headstart model. The message says which and what to do."""


def is_hub_ref(ref: str | Path) -> bool:
    """Whether ``ref`` names a hub repository the way timm does (``hf-hub:org/name``; ``hf_hub:`` too)."""
    return isinstance(ref, str) and ref.partition(":")[0].lower() in ("hf-hub", "hf_hub") and ":" in ref


def split_ref(ref: str) -> tuple[str, str | None]:
    """``"hf-hub:org/name@rev"`` (or ``"org/name@rev"``) -> ``("org/name", "rev")``; no revision gives None."""
    name = ref.partition(":")[2] if is_hub_ref(ref) else ref
    repo_id, _, revision = name.partition("@")
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise HubError(f"{ref!r} is not a hub repository id; write ORG/NAME (for example hf-hub:my-org/ants-vs-bees)")
    return repo_id, revision or None


def pull(ref: str, out: str | Path | None = None, overwrite: bool = False) -> Path:
    """Download a headstart model from the hub; returns the folder, a run folder that ``headstart.load`` reads.

    Args:
        ref: ``org/name``, ``org/name@revision`` or ``hf-hub:org/name[@revision]``.
        out: copy the model into this folder; default: the hub cache's own snapshot folder (read-only use).
        overwrite: replace the files of a non-empty ``out`` (otherwise refused, so no run is overwritten).

    Raises:
        HubError: offline with nothing cached, no such repository or revision, or no headstart model in it.
    """
    repo_id, revision = split_ref(ref)
    target = Path(out) if out is not None else None
    if target is not None and target.exists() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(f"{target} already holds files; pass --overwrite or choose another --out")
    folder = _download(repo_id, revision)
    info_path = folder / "model.json"
    if not info_path.is_file():
        raise HubError(
            f"{repo_id} holds no headstart model (no model.json). A timm model repository is a backbone: "
            f"train on it with --backbone hf-hub:{repo_id}"
        )
    _fetch_backbone_config(json.loads(info_path.read_text()))
    if target is None:
        return folder
    # Into the cache first, then copied: a failed download leaves the folder asked for as it was.
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for name in (*MODEL_FILES, CARD):
        if (folder / name).is_file():
            shutil.copyfile(folder / name, target / name)  # the cache's files are links to its blobs: copy content
    return target


def _download(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        folder = snapshot_download(
            repo_id, revision=revision, allow_patterns=[*MODEL_FILES, CARD], library_name="headstart"
        )
    except RevisionNotFoundError as error:
        raise HubError(f"{repo_id} has no revision {revision!r}; leave out @REVISION for the latest") from error
    except GatedRepoError as error:
        raise HubError(f"{repo_id} is gated: accept its terms on the hub, then set HF_TOKEN") from error
    except RepositoryNotFoundError as error:
        raise HubError(
            f"no model repository {repo_id} on the hub, or it is private: check the name, or log in "
            "(`hf auth login`, or set HF_TOKEN) with an account that can read it"
        ) from error
    except HfHubHTTPError as error:  # 401, 403, 5xx: the hub answered, but not with the files
        raise HubError(f"the hub refused {repo_id}: {str(error).splitlines()[0]}") from error
    except (LocalEntryNotFoundError, OSError) as error:
        raise offline_error(repo_id, error) from error
    return Path(folder)


def offline_error(repo_id: str, error: Exception, pushing: bool = False) -> HubError:
    """The error for a hub that cannot be reached (no network, ``HF_HUB_OFFLINE=1``), with nothing cached to use."""
    reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    if pushing:
        return HubError(
            f"cannot reach the hub to push to {repo_id} ({reason}). Connect to the internet (and unset "
            "HF_HUB_OFFLINE), then push again; the run folder is unchanged."
        )
    return HubError(
        f"cannot download {repo_id} from the hub, and it is not in the hub cache ({reason}). Connect to the internet "
        "(and unset HF_HUB_OFFLINE) once to pull it; a model pulled before works offline. To move a model without the "
        "hub, copy its run folder."
    )


def _fetch_backbone_config(info: dict[str, Any]) -> None:
    """A model whose backbone is a hub name (``hf-hub:org/net``) rebuilds that network from the backbone's own
    config.json: fetch it while online, so the model also loads offline later."""
    backbone = str(info.get("backbone", ""))
    if not is_hub_ref(backbone):
        return
    from huggingface_hub import hf_hub_download

    repo_id, revision = split_ref(backbone)
    with contextlib.suppress(Exception):  # best effort: loading the model names the file if it is still missing
        hf_hub_download(repo_id, "config.json", revision=revision, library_name="headstart")
