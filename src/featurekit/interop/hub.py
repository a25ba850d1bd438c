"""`hf:ORG/REPO` ids: the files of a Hugging Face Hub repository (or one subfolder of it) through `huggingface_hub`,
into its usual cache; an unreachable Hub (or HF_HUB_OFFLINE=1 without the files cached) is a FeaturekitError."""

from __future__ import annotations

from pathlib import Path

from ..errors import FeaturekitError


def download(repo_id: str, subfolder: str | None = None, revision: str | None = None) -> Path:
    """The local folder holding `repo_id`'s files (only `subfolder/*` when given)."""
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise FeaturekitError(f"hf:{repo_id} is not a Hub repository id; write hf:ORG/REPO (and subfolder= for one dictionary)")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as err:  # pragma: no cover - a dependency of transformers
        raise FeaturekitError("loading hf: ids needs huggingface_hub (pip install huggingface_hub)") from err
    pattern = f"{subfolder.strip('/')}/*" if subfolder else None
    try:
        root = Path(snapshot_download(repo_id, revision=revision, allow_patterns=pattern))
    except Exception as err:  # the Hub client raises many types: offline, not found, gated, network
        raise FeaturekitError(
            f"could not fetch hf:{repo_id}{f' (subfolder {subfolder})' if subfolder else ''} from the Hugging Face Hub "
            f"({type(err).__name__}: {err}); the Hub is unreachable or offline (HF_HUB_OFFLINE), or the repository is "
            f"private/gated or misnamed. Download it where the Hub is reachable and pass the local folder instead") from err
    folder = root / subfolder if subfolder else root
    if not folder.exists():
        raise FeaturekitError(f"hf:{repo_id} has no subfolder {subfolder!r}; list the repository's folders on the Hub")
    return folder
