"""Secrets kept out of everything the toolkit writes: config.yaml, the model card and its training command.

A value is secret when the last part of its key names a token, key, secret or password
(`+push.hub_token=…`, `+HF_TOKEN=…`, `wandb.api_key`; not `max_new_tokens`), or when it looks like a
Hugging Face token (`hf_` and 30+ letters or digits) whatever its key. Secret values become `<redacted>`.
"""

from __future__ import annotations

import re
import shlex

REDACTED = "<redacted>"
# The last part of a key, whole or after `_`/`-`: hub_token, HF_TOKEN, api_key, apikey, db-password.
SECRET_KEY = re.compile(r"(^|[_-])(token|secret|password|passwd|credentials?|apikey|key)$", re.IGNORECASE)
HF_TOKEN_SHAPE = re.compile(r"\bhf_[A-Za-z0-9]{30,}")


def is_secret_key(key: str) -> bool:
    """`key` is a config path (`push.hub_token`), possibly with Hydra's `+`/`++`/`~` prefix."""
    return bool(SECRET_KEY.search(str(key).lstrip("+~").rsplit(".", 1)[-1]))


def redact_text(text: str) -> str:
    return HF_TOKEN_SHAPE.sub(REDACTED, text)


def redact_tree(tree):
    """A copy of a plain dict/list tree (a config as a container) with secret values replaced."""
    if isinstance(tree, dict):
        return {k: REDACTED if is_secret_key(k) and v is not None else redact_tree(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [redact_tree(v) for v in tree]
    return redact_text(tree) if isinstance(tree, str) else tree


def redact_arg(arg: str) -> str:
    """One command-line argument: `key=value` with a secret key keeps only its key."""
    key, eq, _ = arg.partition("=")
    return f"{key}={REDACTED}" if eq and is_secret_key(key) else redact_text(arg)


def redact_command(command: str) -> str:
    """A shell command line (as `push.command` holds it) with every secret argument redacted."""
    try:
        args = shlex.split(command)
    except ValueError:  # unbalanced quotes: show none of it rather than guess where a secret ends
        return " ".join([*command.split()[:2], REDACTED])
    return shlex.join(redact_arg(a) for a in args)


def config_yaml(cfg) -> str:
    """The composed config as YAML (interpolations resolved) with secret values redacted: what
    `config.yaml` in a run folder holds."""
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create(redact_tree(OmegaConf.to_container(cfg, resolve=True))))
