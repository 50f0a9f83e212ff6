"""`w2vbert-asr download`: fetch every model and processor a recipe's commands need into the Hugging Face cache.

Usage (where the Hub can be reached, e.g. a cluster's login node; then the jobs run with HF_HUB_OFFLINE=1):
    w2vbert-asr download recipe=mn
    w2vbert-asr download recipe=mn model=omniasr_ctc_300m "bakeoff.baselines=[omniasr_ctc,mms]"
    HF_HOME=/shared/hf w2vbert-asr download recipe=mn      # a cache the compute nodes share

What a recipe's commands need: `train`'s checkpoint (model.name_or_path, unless built from model.architecture),
`baseline`'s (baseline.name_or_path), and every baseline and backbone of `bakeoff` (composed from the same
arguments); MMS's adapter for the recipe's language too. Of each model: config, processor and tokenizer files and
the safetensors weights (weights.PATTERNS). Prints each model's size and where the cache keeps it.
"""

from __future__ import annotations

from . import UsageError
from .storage import human_bytes
from .weights import cache_dir, fetch, hub_ids, offline


def needed(cfg) -> list[tuple[str, object]]:
    """(Hub id, the baseline config that needs it or None) of everything the recipe's commands load, in order."""
    from .bakeoff import stage_configs

    pairs = [(None if cfg.model.architecture else cfg.model.name_or_path, None)]
    if not cfg.baseline.random_standin:
        pairs.append((cfg.baseline.name_or_path, cfg.baseline))
    baselines, backbones = stage_configs(cfg)
    pairs += [(c.baseline.name_or_path, c.baseline) for c in baselines.values() if not c.baseline.random_standin]
    pairs += [(None if c.model.architecture else c.model.name_or_path, None) for c in backbones.values()]
    seen: dict[str, object] = {}
    for ref, bcfg in pairs:
        for repo_id in hub_ids([ref]):
            seen.setdefault(repo_id, bcfg)
    return list(seen.items())


def _adapter(folder, bcfg) -> list[str]:
    """MMS: the adapter file of the recipe's language (its vocabulary names the languages it has)."""
    import json

    from .languages import mms_language

    if bcfg is None or bcfg.family != "mms":
        return []
    languages = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    return [f"adapter.{mms_language(str(bcfg.language), list(languages), str(bcfg.name_or_path))}.safetensors"]


def download(cfg) -> dict:
    """Fetch and list them -> {repo id: bytes}."""
    if offline():
        raise UsageError("HF_HUB_OFFLINE is set: `download` fetches from the Hub; unset it, on a machine that can "
                         "reach the Hub")
    sizes = {}
    for repo_id, bcfg in needed(cfg):
        try:
            folder, size = fetch(repo_id)
            extra = _adapter(folder, bcfg)
            if extra:
                folder, size = fetch(repo_id, extra)
        except UsageError:
            raise
        except Exception as e:  # no network, no such model, no access: one line each
            raise UsageError(f"could not download {repo_id}: {type(e).__name__}: {str(e).splitlines()[0]}") from e
        sizes[repo_id] = size
        print(f"{repo_id:<40} {human_bytes(size):>10}  {folder}")
    print(f"{len(sizes)} model(s), {human_bytes(sum(sizes.values()))} in {cache_dir()}; run the commands with "
          "HF_HUB_OFFLINE=1 and this HF_HOME where the Hub cannot be reached")
    return sizes
