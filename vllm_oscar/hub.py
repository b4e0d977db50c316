"""Find rotation artifacts (local folder, Hugging Face Hub, RotationZoo layout) and publish them."""

from __future__ import annotations

import os
import re
from pathlib import Path

from vllm_oscar.artifact import ArtifactError, RotationArtifact, is_zoo_folder, load_zoo
from vllm_oscar.config import CARD_FILENAME, CONFIG_FILENAME, ROTATIONS_FILENAME

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_ALLOW_PATTERNS = [CONFIG_FILENAME, ROTATIONS_FILENAME, CARD_FILENAME, "*.pt"]


def split_source(source: str) -> tuple[str, str | None]:
    """``"org/name@rev"`` -> ``("org/name", "rev")``; a source without ``@`` has no revision."""
    if "@" in source:
        repo, rev = source.rsplit("@", 1)
        if not rev:
            raise ArtifactError(f"rotation source {source!r} has an empty revision after '@'")
        return repo, rev
    return source, None


def resolve_rotations_dir(source: str, *, subfolder: str | None = None) -> Path:
    """A local folder as is, or a Hub repo id (``org/name[@revision]``) downloaded into the HF cache.

    Downloads go through ``huggingface_hub.snapshot_download``, which honours ``HF_HUB_OFFLINE=1``
    (cache only) and ``HF_HOME``/``HF_HUB_CACHE``.
    """
    local = Path(source).expanduser()
    if local.is_dir():
        folder = local / subfolder if subfolder else local
    else:
        repo_id, revision = split_source(source)
        if not _HUB_ID.match(repo_id):
            raise ArtifactError(
                f"rotation source {source!r} is neither an existing folder nor a Hub repo id "
                "('org/name' or 'org/name@revision')"
            )
        from huggingface_hub import snapshot_download  # noqa: PLC0415
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError  # noqa: PLC0415

        patterns = [f"{subfolder}/{p}" for p in _ALLOW_PATTERNS] if subfolder else _ALLOW_PATTERNS
        try:
            snap = snapshot_download(repo_id=repo_id, revision=revision, allow_patterns=patterns)
        except LocalEntryNotFoundError as exc:
            offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")
            hint = " (HF_HUB_OFFLINE is set and the cache has no copy)" if offline else ""
            raise ArtifactError(f"could not fetch rotations {source!r}{hint}: {exc}") from exc
        except HfHubHTTPError as exc:
            raise ArtifactError(f"could not fetch rotations {source!r} from the Hub: {exc}") from exc
        folder = Path(snap) / subfolder if subfolder else Path(snap)
    if not folder.is_dir():
        raise ArtifactError(f"rotation folder {folder} does not exist")
    return folder


def load_rotations(source: str, *, subfolder: str | None = None, **zoo_facts) -> RotationArtifact:
    """Load rotations from a local folder or the Hub, in this package's format or the RotationZoo's.

    ``zoo_facts`` (``base_model``, ``quantization``, ``windows``) fill in what RotationZoo files lack.
    """
    folder = resolve_rotations_dir(source, subfolder=subfolder)
    if (folder / CONFIG_FILENAME).exists() or (folder / ROTATIONS_FILENAME).exists():
        return RotationArtifact.load(folder)
    if is_zoo_folder(folder):
        return load_zoo(folder, **zoo_facts)
    raise ArtifactError(
        f"{folder} holds no OSCAR rotations: expected {ROTATIONS_FILENAME} + {CONFIG_FILENAME} "
        "(vllm-oscar format) or k_rotation_qqt_r_h_pbr.pt + v_rotation_sst_r_h_pbr.pt (RotationZoo)"
    )


def publish(folder: str | os.PathLike, repo_id: str, *, private: bool = False, revision: str | None = None,
            commit_message: str | None = None, api=None) -> str:
    """Upload an artifact folder to the Hub (``create_repo`` then ``upload_folder``); returns the commit URL.

    The folder is validated first, so a broken artifact never reaches the Hub.
    """
    art = RotationArtifact.load(folder)  # validates
    if not _HUB_ID.match(repo_id):
        raise ArtifactError(f"--push-to-hub {repo_id!r} is not a Hub repo id of the form 'org/name'")
    if api is None:
        from huggingface_hub import HfApi  # noqa: PLC0415

        api = HfApi()
    api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
    m = art.config.base_model
    info = api.upload_folder(
        repo_id=repo_id,
        repo_type="model",
        folder_path=str(folder),
        revision=revision,
        allow_patterns=[CONFIG_FILENAME, ROTATIONS_FILENAME, CARD_FILENAME],
        commit_message=commit_message or f"OSCAR rotations for {m.id} ({m.num_layers} layers, head_dim {m.head_dim})",
    )
    return str(getattr(info, "commit_url", info))
