"""What a config value may be, and the one line that says what is wrong with a composed config.

The schema (config.py) attaches a check to each key with closed choices or a range; `validate` walks a
composed config, refuses keys the schema does not declare (Hydra's `+key=value` adds any), runs those checks
and the few relations between keys. `explain` turns what Hydra or OmegaConf raised while composing into one
line. Every message names the key and what it accepts, or the closest valid key.

Usage:
    from w2vbert_asr.checks import validate
    validate(cfg)                      # ConfigError (a UsageError) naming the key and what it accepts
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import re
from collections.abc import Callable, Sequence
from typing import Any

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from . import UsageError
from .geometry import SAMPLING_RATE
from .redact import is_secret_key, redact_text

# Keys that left the schema. A command line or an old recipe that sets one gets one line naming what to
# use instead. RENAMED: old dotted key -> its new dotted key; REMOVED: dotted key -> why it is gone.
RENAMED: dict[str, str] = {}
REMOVED: dict[str, str] = {
    "data.sampling_rate": f"audio is always resampled to {SAMPLING_RATE // 1000} kHz, the rate W2v-BERT 2.0's "
                          "feature extractor expects",
}
SECRETS_HINT = ("secrets never go into the config, which training writes to config.yaml: "
                "the Hub token comes from HF_TOKEN or `hf auth login`")
NO_TRACKER = "none"


class ConfigError(UsageError):
    """A composed config that breaks its schema: the message is the whole `error:` line, without the prefix."""


# --------------------------------------------------------------------------------------------- checks
# A check takes (dotted key, plain value) and returns the whole complaint, or None when the value is fine.
def _show(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


@dataclasses.dataclass(frozen=True)
class OneOf:
    """One of a closed set; `values` may be a function, for sets a library defines (imported when checked)."""

    values: Sequence | Callable[[], Sequence]
    hint: str = ""

    def allowed(self) -> tuple:
        return tuple(self.values() if callable(self.values) else self.values)

    def __call__(self, key: str, value) -> str | None:
        allowed = self.allowed()
        if value in allowed:
            return None
        close = difflib.get_close_matches(str(value), [str(a) for a in allowed if a is not None], n=1)
        guess = f" (did you mean {close[0]}?)" if close else ""
        return f"{key}={_show(value)}: choose one of {', '.join(_show(a) for a in allowed)}{guess}{self.hint}"


@dataclasses.dataclass(frozen=True)
class Range:
    """A number within bounds; `low_open`/`high_open` exclude the bound itself."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def ok(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def describe(self) -> str:
        if self.low is not None and self.high is not None:
            return (f"within {'(' if self.low_open else '['}{_show(self.low)}, {_show(self.high)}"
                    f"{')' if self.high_open else ']'}")
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {_show(self.low)}"
        return f"{'<' if self.high_open else '<='} {_show(self.high)}"

    def __call__(self, key: str, value) -> str | None:
        return None if value is None or self.ok(value) else f"{key}={_show(value)}: give a number {self.describe()}"


@dataclasses.dataclass(frozen=True)
class AutoOr:
    """`auto`, or a whole number within `bounds`."""

    bounds: Range

    def __call__(self, key: str, value) -> str | None:
        if value == "auto" or (isinstance(value, int) and self.bounds.ok(value)):
            return None
        return f"{key}={_show(value)}: give auto or a whole number {self.bounds.describe()}"


@dataclasses.dataclass(frozen=True)
class Device:
    """auto, cpu, cuda or cuda:N (what devices.pick_device accepts)."""

    def __call__(self, key: str, value) -> str | None:
        if isinstance(value, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
            return None
        return f"{key}={_show(value)}: choose auto, cpu, cuda or cuda:N"


@dataclasses.dataclass(frozen=True)
class Each:
    """Every item of a list passes `check`; with `nonempty`, the list has at least one."""

    check: Callable[[str, Any], str | None]
    nonempty: bool = False

    def __call__(self, key: str, value) -> str | None:
        if self.nonempty and not value:
            return f"{key}=[]: give at least one"
        for i, item in enumerate(value or []):
            problem = self.check(f"{key}[{i}]", item)
            if problem:
                return problem
        return None


@dataclasses.dataclass(frozen=True)
class KeysOf:
    """A free-form mapping whose keys must be fields of a library's config (`names` imported when checked)."""

    names: Callable[[], Sequence]
    owner: str

    def __call__(self, key: str, value) -> str | None:
        names = set(self.names())
        for name in value or {}:
            if name not in names:
                close = difflib.get_close_matches(name, sorted(names), n=1)
                guess = f"; did you mean {key}.{close[0]}?" if close else ""
                article = "an" if self.owner[:1].lower() in "aeiou" else "a"
                return f"{key}.{name} is not {article} {self.owner} setting{guess}"
        return None


def checked(check: Callable[[str, Any], str | None]):
    """A schema field that `validate` checks; like every field here it has no default (conf/ gives it)."""
    return dataclasses.field(default=MISSING, metadata={"check": check})


POSITIVE = Range(0, low_open=True)
AT_LEAST_0 = Range(0)
AT_LEAST_1 = Range(1)
PROBABILITY = Range(0, 1)
NONEMPTY = Each(lambda key, item: None, nonempty=True)  # a list with at least one item, any items


def scheduler_names() -> tuple[str, ...]:
    from transformers.trainer_utils import SchedulerType

    return tuple(s.value for s in SchedulerType)


def trackers() -> tuple[str, ...]:
    from accelerate.utils import LoggerType

    return (*(t.value for t in LoggerType), NO_TRACKER)


# omniASR-CTC's time masking reads these from its config itself (omniasr.attach_time_masking).
OMNIASR_MASK_KEYS = ("mask_time_prob", "mask_time_length", "mask_time_min_masks")


@functools.lru_cache(maxsize=None)
def family_config_fields(family: str) -> tuple[str, tuple[str, ...]]:
    """-> (config class name, the settings model.architecture / model.config_overrides may set) of a family."""
    if family == "omniasr_ctc":
        from transformers import OmniASRCTCConfig
        from transformers.models.omniasr.configuration_omniasr import OmniASRAudioConfig

        fields = {*OmniASRCTCConfig().to_dict(), *OmniASRAudioConfig().to_dict(), *OMNIASR_MASK_KEYS}
        return "OmniASRCTCConfig", tuple(sorted(fields))
    from transformers import Wav2Vec2BertConfig

    return "Wav2Vec2BertConfig", tuple(Wav2Vec2BertConfig().to_dict())


MODEL_FAMILIES = ("w2v_bert", "omniasr_ctc")  # families.TRAINABLE (model.family)


# --------------------------------------------------------------------------------------------- validate
def validate(cfg: DictConfig) -> DictConfig:
    """Refuse keys the schema does not declare, values outside their choices or ranges, and contradictory
    settings; -> cfg. Missing values (`???`) pass: the command that reads one reports it."""
    _check_node(cfg, "")
    for check in RELATIONS:
        problem = check(cfg)
        if problem:
            raise ConfigError(problem)
    return cfg


def _check_node(node: DictConfig, prefix: str) -> None:
    schema = OmegaConf.get_type(node)
    if not dataclasses.is_dataclass(schema):
        return  # a free-form mapping (model.architecture, text.replace), or a section code replaced
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key in node.keys():
        if key not in fields:
            raise ConfigError(unknown_key(f"{prefix}{key}", list(fields)))
    for name, f in fields.items():
        if OmegaConf.is_missing(node, name) or OmegaConf.is_interpolation(node, name):
            continue
        child = node._get_node(name)
        if isinstance(child, DictConfig) and not child._is_none():
            _check_node(child, f"{prefix}{name}.")
        check = f.metadata.get("check")
        if check is not None:
            try:
                value = OmegaConf.to_container(child, resolve=True) if isinstance(child, (DictConfig, ListConfig)) \
                    else child._value()
            except OmegaConfBaseException:
                continue  # an item interpolates a missing or broken value: reported where it is read
            problem = check(f"{prefix}{name}", value)
            if problem:
                raise ConfigError(redact_text(problem))


def _value(cfg: DictConfig, key: str):
    """The resolved value at `key`, or _UNSET when it is missing, absent or does not resolve."""
    try:
        return OmegaConf.select(cfg, key, default=_UNSET, throw_on_missing=True)
    except OmegaConfBaseException:
        return _UNSET


_UNSET = object()


def _durations(cfg) -> str | None:
    low, high = _value(cfg, "data.min_duration"), _value(cfg, "data.max_duration")
    if _UNSET not in (low, high) and low > high:
        return f"data.min_duration={_show(low)} is above data.max_duration={_show(high)}: every clip would be skipped"
    return None


def _chunks(cfg) -> str | None:
    chunk, overlap = _value(cfg, "transcribe.chunk_seconds"), _value(cfg, "transcribe.overlap_seconds")
    if _UNSET not in (chunk, overlap) and overlap >= chunk:
        return (f"transcribe.overlap_seconds={_show(overlap)} must be below transcribe.chunk_seconds={_show(chunk)}"
                ": chunks would not advance")
    return None


def _length(cfg) -> str | None:
    steps, epochs = _value(cfg, "train.max_steps"), _value(cfg, "train.num_epochs")
    if steps is None and epochs is None:
        return "train.max_steps and train.num_epochs are both null: set one to say how long to train"
    return None


def _folds(cfg) -> str | None:
    if _value(cfg, "audit.folds") == 1:
        return "audit.folds=1: give 0 (score with model=<dir> alone) or 2 or more folds (each scored by a model " \
               "trained on the others)"
    return None


def _noise_snr(cfg) -> str | None:
    snr = _value(cfg, "train.noise_snr")
    if snr is not _UNSET and snr is not None and (len(snr) != 2 or snr[0] > snr[1]):
        return f"train.noise_snr={_show(list(snr))}: give [lowest, highest] signal-to-noise ratio in dB, e.g. [10, 30]"
    return None


def _entropy_order(cfg) -> str | None:
    measure, alpha = _value(cfg, "confidence.measure"), _value(cfg, "confidence.alpha")
    if measure in ("tsallis", "renyi") and alpha == 1:
        return f"confidence.alpha=1 with confidence.measure={measure}: the entropy order must differ from 1 (its limit " \
               "is measure=gibbs)"
    return None


def _family_keys(cfg) -> str | None:
    """model.architecture and model.config_overrides name settings of model.family's config (checked here, not
    by the schema, because which config that is depends on model.family)."""
    family = _value(cfg, "model.family")
    if family not in MODEL_FAMILIES:
        return None
    owner, fields = family_config_fields(family)
    for section in ("architecture", "config_overrides"):
        value = _value(cfg, f"model.{section}")
        value = OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig) else value
        problem = KeysOf(lambda: fields, owner)(f"model.{section}", value) if isinstance(value, dict) else None
        if problem:
            return problem
    return None


def _quantize(cfg) -> str | None:
    quantize, family = _value(cfg, "baseline.quantize"), _value(cfg, "baseline.family")
    if quantize not in (None, _UNSET) and family not in ("omniasr_llm", _UNSET):
        return (f"baseline.quantize={quantize} applies to baseline=omniasr_llm only (baseline.family={family} "
                "loads its weights as baseline.dtype): set baseline.quantize=null")
    return None


RELATIONS = (_durations, _chunks, _length, _noise_snr, _folds, _entropy_order, _family_keys, _quantize)


# --------------------------------------------------------------------------------------------- messages
def unknown_key(key: str, valid: Sequence[str]) -> str:
    """The one line for a key the schema lacks: its new name, why it went, or the closest valid key."""
    if key in RENAMED:
        return f"{key} was renamed: use {RENAMED[key]}"
    if key in REMOVED:
        return f"{key} was removed: {REMOVED[key]}"
    if is_secret_key(key):
        return f"{key} is not a config key: {SECRETS_HINT}"
    prefix, _, leaf = key.rpartition(".")
    where = f"{prefix}." if prefix else ""
    close = difflib.get_close_matches(leaf, list(valid), n=1)
    if close:
        return f"{key} is not a config key; did you mean {where}{close[0]}?"
    return f"{key} is not a config key; {prefix or 'the top level'} has {', '.join(valid)}"


def explain(error: BaseException, overrides: Sequence[str] = ()) -> str:
    """One line for an exception Hydra or OmegaConf raised while composing with `overrides`."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException, MissingConfigException, OverrideParseException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

    # Hydra raises from OmegaConf's error when applying an override, and within its handler (no `from`)
    # when merging a config file; then its message starts by naming the file.
    cause = next((e for e in (error.__cause__, error.__context__) if isinstance(e, OmegaConfBaseException)), error)
    source = re.match(r"In '([^']+)': ", str(error))
    where = f"in {source.group(1)}: " if source and cause is not error else ""
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and getattr(cause, "full_key", None):
        schema = getattr(cause, "object_type", None)
        valid = [f.name for f in dataclasses.fields(schema)] if dataclasses.is_dataclass(schema) else \
            [str(k) for k in (cause.parent_node or {}) if k != "hydra"]
        return where + unknown_key(str(cause.full_key), valid)
    if isinstance(cause, ValidationError) and getattr(cause, "full_key", None):
        return redact_text(f"{where}{cause.full_key}: {_first_line(cause.msg)}")
    if isinstance(error, MissingConfigException) and error.options is not None and error.missing_cfg_file:
        group, _, option = str(error.missing_cfg_file).rpartition("/")
        close = difflib.get_close_matches(option, list(error.options), n=1)
        choices = ", ".join(error.options)
        if close:
            return f"{group}={option} is not an option; did you mean {group}={close[0]}? (conf/{group}/ has {choices})"
        return f"{group}={option} is not an option; conf/{group}/ has {choices}"
    if isinstance(error, OverrideParseException):
        parser = OverridesParser.create()
        for override in overrides:
            try:
                parser.parse_override(override)
            except HydraException as e:
                return redact_text(f"cannot parse {override}: {_first_line(str(e))}")
    return redact_text(": ".join(_message_lines(error)))


def _first_line(text: str) -> str:
    return next(iter(_message_lines(text)), "")


def _message_lines(error) -> list[str]:
    """The lines of an exception message that say what went wrong (not OmegaConf's key dump or Hydra's
    search path and documentation links)."""
    lines = []
    for line in str(error).splitlines():
        text = line.strip()
        if text.startswith(("Config search path", "See https://", "Set the environment variable")):
            break
        if text and not text.startswith(("full_key:", "object_type=", "reference_type=")):
            lines.append(text)
    return lines
