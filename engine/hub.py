"""Models named by a Hugging Face hub id: fetched into the hub cache, served from there.

`--model org/name` downloads only what the engine reads (config, generation config,
tokenizer files, chat template, safetensors shards and their index); `--model
org/name/file.gguf` downloads that one GGUF file. Files land in the hub cache ($HF_HOME, by
default ~/.cache/huggingface), so a restarted replica on the same machine reuses them. The
token comes from $HF_TOKEN (or $HUGGING_FACE_HUB_TOKEN); a gated model without one fails with
a message saying so. An existing local path is returned unchanged.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

ENGINE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "*.safetensors",
    "*.safetensors.index.json",
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(/[^/]+\.gguf)?$")


class HubError(ValueError):
    """A hub model cannot be fetched; the message says why and what to do."""


def is_hub_id(model: str) -> bool:
    """`org/name` or `org/name/file.gguf` that is not a path on this machine."""
    return not Path(model).expanduser().exists() and bool(_HUB_ID.match(model))


def hub_token() -> str | None:
    return os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN") or None


def resolve_model(model: str, token: str | None = None) -> str:
    """A local path for `model`: itself when it exists, else the hub files fetched to the cache."""
    if not is_hub_id(model):
        return model
    from huggingface_hub import hf_hub_download, snapshot_download

    token = token or hub_token()
    parts = model.split("/")
    repo = "/".join(parts[:2])
    try:
        if len(parts) == 3:
            return hf_hub_download(repo, parts[2], token=token)
        path = Path(snapshot_download(repo, allow_patterns=list(ENGINE_FILES), token=token))
    except Exception as e:
        raise _hub_error(e, repo, token) from e
    missing = [f for f in ("config.json", "tokenizer.json") if not (path / f).exists()]
    if missing or not any(path.glob("*.safetensors")):
        what = ", ".join(missing) if missing else "*.safetensors weights"
        raise HubError(
            f"hub model {repo} has no {what}: the engine serves HF safetensors models "
            "(or name one GGUF file: org/name/file.gguf)"
        )
    return str(path)


def _hub_error(e: Exception, repo: str, token: str | None) -> HubError:
    from huggingface_hub import errors

    if isinstance(e, errors.GatedRepoError):
        if token is None:
            return HubError(
                f"hub model {repo} is gated: accept its license at https://huggingface.co/{repo} "
                "and pass a token with access (HF_TOKEN)"
            )
        return HubError(
            f"hub model {repo} is gated and the HF_TOKEN given has no access to it: accept its "
            f"license at https://huggingface.co/{repo} with that account"
        )
    if isinstance(e, errors.RepositoryNotFoundError):
        hint = "" if token else " (a private model needs HF_TOKEN)"
        return HubError(f"no model {repo} on the hub{hint}")
    if isinstance(e, errors.LocalEntryNotFoundError):
        return HubError(
            f"hub model {repo} is not in the hub cache ({_cache_dir()}) and the hub cannot be "
            f"reached (HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')}): {e}"
        )
    if isinstance(e, errors.EntryNotFoundError):
        return HubError(f"hub model {repo} has no such file: {e}")
    return HubError(f"fetching hub model {repo} failed: {type(e).__name__}: {e}")


def _cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)
