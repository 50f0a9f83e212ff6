"""Model weights from the Hugging Face Hub: is a model in the local cache, can the Hub be reached, fetch it.

A command that needs pretrained weights (`train` with a checkpoint, `baseline`, `bakeoff`, `transcribe` of a
Hub id) calls `require` first, before it reads or prepares any data: a model that is neither in the cache nor
reachable (an offline cluster node, HF_HUB_OFFLINE=1) is one error line naming the model id and the command that
fetches it, instead of a traceback after minutes of preparing. `w2vbert-asr download` (download.py) fetches
everything a recipe's commands need where the Hub can be reached; a cluster job then runs with HF_HUB_OFFLINE=1
and the same HF_HOME.

What is fetched of a model: its config and processor files and its safetensors weights (never pickles, never
other languages' adapters: MMS's one adapter is fetched for the language).

Usage:
    from w2vbert_asr.weights import hub_ids, require
    require(hub_ids([cfg.model.name_or_path]), "train")
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

from . import UsageError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# The files of a model folder the toolkit reads (config, processor, tokenizer, chat template, safetensors).
PATTERNS = ("*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "tokenizer*")
ADAPTERS = "adapter.*"  # MMS's per-language adapters: only the one a baseline uses is fetched
REACH_TIMEOUT_S = 10.0


def hub_ids(refs: Iterable[str | None]) -> list[str]:
    """The Hub model ids among `refs` (local folders, None and duplicates left out), in order."""
    out = []
    for ref in refs:
        ref = str(ref or "")
        if ref and HUB_ID.match(ref) and not Path(ref).exists() and ref not in out:
            out.append(ref)
    return out


def offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def cached_folder(repo_id: str) -> Path | None:
    """The cached snapshot of `repo_id` when it holds a config.json and safetensors weights, else None."""
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(repo_id, "config.json")
    if not isinstance(config, str):
        return None
    folder = Path(config).parent
    return folder if any(folder.glob("*.safetensors")) else None


def reachable(repo_id: str) -> bool | None:
    """True when the Hub answers for `repo_id`, False when it says there is no such model, None when it cannot
    be reached."""
    if offline():
        return None
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        HfApi().model_info(repo_id, timeout=REACH_TIMEOUT_S)
    except RepositoryNotFoundError:
        return False
    except Exception:  # no network, a proxy, a timeout: it cannot be reached
        return None
    return True


def fetch_hint(command: str) -> str:
    return (f"fetch it where the Hub can be reached with `w2vbert-asr download` and this `{command}` command's "
            "arguments (the recipe and overrides), then run with that HF_HOME")


def require(repo_ids: Iterable[str], command: str) -> None:
    """UsageError (one line) for the first model that is neither cached nor reachable."""
    for repo_id in repo_ids:
        if cached_folder(repo_id) is not None:
            continue
        found = reachable(repo_id)
        if found is False:
            raise UsageError(f"{repo_id} is not a model on the Hugging Face Hub; check the model id")
        if found is None:
            why = "HF_HUB_OFFLINE is set" if offline() else "the Hub cannot be reached"
            raise UsageError(f"{command} needs the model {repo_id}, which is not in the Hugging Face cache "
                             f"({cache_dir()}) and {why}: {fetch_hint(command)}")


def fetch(repo_id: str, files: Iterable[str] = ()) -> tuple[Path, int]:
    """Download what the toolkit reads of `repo_id` (no MMS adapters) and the named `files` into the cache
    -> (snapshot folder, bytes in it)."""
    from huggingface_hub import snapshot_download

    folder = Path(snapshot_download(repo_id, allow_patterns=list(PATTERNS), ignore_patterns=[ADAPTERS]))
    for name in files:
        snapshot_download(repo_id, allow_patterns=[name])
    size = sum(os.path.getsize(p) for p in folder.rglob("*") if p.is_file())
    return folder, size
