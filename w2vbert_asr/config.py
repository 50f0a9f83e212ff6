"""The typed schema of every config group, and the checks a composed config must pass before a command runs.

conf/ keeps the values and the comments that explain them; the dataclasses here give each key its type,
its closed choices or its range, and no value of their own (`???`), so a default lives in one place. They
are registered in Hydra's ConfigStore under `schema/...`, and each YAML file names its schema in its
defaults list (`- /schema/train@_here_`); `conf/config.yaml` names `Config`, whose sections are typed too.
Composition therefore refuses a key the schema lacks (`train.max_stepz=3`) and a value of the wrong type
(`train.max_steps=abc`). Hydra's `+key=value` adds a key to any section, so `validate` walks the composed
config and refuses what the schema does not declare, then checks choices, ranges and the few relations
between keys. Both the CLI and `w2vbert_asr.cli.compose` call it; every mistake is one ConfigError line.

Closed choices are plain strings (not Enums), so config.yaml, JSON and f-strings show `auto`, not
`MixedPrecision.auto`. A value given as an interpolation (`eval.quantize: ${export.quantize}`) is checked
where it is set, not where it is read.

Usage:
    from w2vbert_asr import config     # registers the schemas; compose conf/ only after it (cli.compose does)

The checks themselves and `validate` live in checks.py.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from .checks import (AT_LEAST_0, AT_LEAST_1, MODEL_FAMILIES, NONEMPTY, POSITIVE, PROBABILITY,
                     AutoOr, Device, Each, OneOf, Range, checked, scheduler_names, trackers)

# Closed choices the modules that read these keys can import instead of spelling them again.
MIXED_PRECISIONS = ("auto", "no", "fp16", "bf16")
ADAMW_IMPLS = ("fused", "foreach", "for_loop")
ATTN_IMPLEMENTATIONS = ("eager", "sdpa")
VOCABULARIES = ("auto", "new")  # omniASR-CTC: keep the checkpoint's tokenizer when it covers the text, or not
UNICODE_FORMS = ("NFC", "NFD", "NFKC", "NFKD")
DIGIT_POLICIES = ("keep", "remove", "drop_row")
BACKENDS = ("torch", "onnx")
QUANTIZE = (None, "int8")
OPTIMIZE_LEVELS = ("none", "basic", "extended")
INT8_WEIGHT_TYPES = ("QInt8", "QUInt8")
TRANSCRIPT_FORMATS = ("txt", "json", "srt")
BASELINE_DTYPES = ("auto", "float32", "float16", "bfloat16")
BASELINE_FAMILIES = ("whisper", "omniasr_ctc", "mms", "omniasr_llm")  # baseline.PARTS
BASELINE_QUANTIZE = (None, "8bit", "4bit")  # bitsandbytes weights (the omniASR LLM on a 16 GB GPU)
CONFIDENCE_MEASURES = ("max_prob", "gibbs", "tsallis", "renyi")
CONFIDENCE_NORMALIZATIONS = ("lin", "exp")
CONFIDENCE_AGGREGATIONS = ("min", "mean", "prod")
DATA_SOURCES = ("commonvoice", "hf", "manifest")
PSEUDO_FILTERS = ("confidence", "alignment", "both")  # what pseudolabel keeps a label by (pseudolabel.py)
AVERAGE_BY = ("last", "best")  # which checkpoints train.average_checkpoints averages (average.py)
LM_ORDERS = (2, 6)  # kaldingram's order-1 path counts <s> as a word; beyond 6 transcripts give no statistics


# --------------------------------------------------------------------------------------------- schema
# Field order is the order `--cfg job` prints; it follows the YAML files.
@dataclasses.dataclass
class DataConfig:
    """conf/data/common.yaml: what every data source shares."""

    min_duration: float = checked(AT_LEAST_0)
    max_duration: float = checked(POSITIVE)
    limit: Optional[int] = checked(AT_LEAST_1)
    report_examples: int = checked(AT_LEAST_0)
    num_proc: Any = checked(AutoOr(AT_LEAST_1))
    force_prepare: bool = MISSING
    extra_train: List[str] = MISSING
    exclude: List[str] = MISSING
    source: str = checked(OneOf(DATA_SOURCES))
    train_splits: List[str] = checked(NONEMPTY)
    eval_split: Optional[str] = MISSING
    test_split: Optional[str] = MISSING


def _source(name: str):
    return checked(OneOf((name,), hint=f" (data.source names the schema of data={name}; pick another source "
                                       "with data=<" + "|".join(DATA_SOURCES) + ">)"))


@dataclasses.dataclass
class CommonVoiceData(DataConfig):
    """conf/data/commonvoice.yaml: a local Common Voice release folder."""

    source: str = _source("commonvoice")
    root: str = MISSING


@dataclasses.dataclass
class HFData(DataConfig):
    """conf/data/hf.yaml: a `datasets` dataset (Hub id or local folder)."""

    source: str = _source("hf")
    name: str = MISSING
    config: Optional[str] = MISSING
    audio_column: str = MISSING
    text_column: str = MISSING


@dataclasses.dataclass
class ManifestData(DataConfig):
    """conf/data/manifest.yaml: one CSV/TSV/JSONL manifest per split (files: split name -> path)."""

    source: str = _source("manifest")
    root: Optional[str] = MISSING
    files: Dict[str, str] = MISSING
    audio_column: str = MISSING
    text_column: str = MISSING


@dataclasses.dataclass
class TextConfig:
    """conf/text/default.yaml: the normaliser."""

    unicode_form: str = checked(OneOf(UNICODE_FORMS))
    lowercase: bool = MISSING
    remove_punctuation: bool = MISSING
    remove_symbols: bool = MISSING
    keep: List[str] = MISSING
    remove: List[str] = MISSING
    replace: Dict[str, str] = MISSING
    digits: str = checked(OneOf(DIGIT_POLICIES))
    drop_latin_words: bool = MISSING
    min_char_count: int = checked(AT_LEAST_1)


@dataclasses.dataclass
class ModelConfig:
    """conf/model/*.yaml: the checkpoint or architecture, and what training changes in it."""

    family: str = checked(OneOf(MODEL_FAMILIES))
    name_or_path: Optional[str] = MISSING
    vocab: str = checked(OneOf(VOCABULARIES))
    architecture: Optional[Dict[str, Any]] = MISSING  # keys of model.family's config: checks._family_keys
    attn_implementation: str = checked(OneOf(ATTN_IMPLEMENTATIONS))
    fast_position_bias: bool = MISSING
    gradient_checkpointing: bool = MISSING
    freeze_feature_encoder: bool = MISSING
    freeze_encoder_layers: int = checked(AT_LEAST_0)
    train_head_only: bool = MISSING
    config_overrides: Dict[str, Any] = MISSING  # keys of model.family's config: checks._family_keys


@dataclasses.dataclass
class TrainConfig:
    """conf/train/*.yaml: the training loop."""

    max_steps: Optional[int] = checked(AT_LEAST_1)
    num_epochs: Optional[int] = checked(AT_LEAST_1)
    init_from: Optional[str] = MISSING
    stop_at_step: Optional[int] = checked(AT_LEAST_1)
    learning_rate: float = checked(POSITIVE)
    adam_betas: List[float] = checked(Each(Range(0, 1, high_open=True), nonempty=True))
    adam_eps: float = checked(POSITIVE)
    weight_decay: float = checked(AT_LEAST_0)
    lr_scheduler: str = checked(OneOf(scheduler_names))
    warmup_steps: int = checked(AT_LEAST_0)
    max_batch_seconds: float = checked(POSITIVE)
    max_batch_size: int = checked(AT_LEAST_1)
    gradient_accumulation_steps: int = checked(AT_LEAST_1)
    max_grad_norm: float = checked(POSITIVE)
    mixed_precision: str = checked(OneOf(MIXED_PRECISIONS))
    adamw_impl: str = checked(OneOf(ADAMW_IMPLS))
    eval_steps: int = checked(AT_LEAST_1)
    logging_steps: int = checked(AT_LEAST_1)
    save_total_limit: int = checked(AT_LEAST_1)
    select_best: bool = MISSING
    average_checkpoints: int = checked(AT_LEAST_0)
    average_by: str = checked(OneOf(AVERAGE_BY))
    speed_perturb: List[float] = checked(Each(Range(0.5, 2.0)))
    noise_dir: Optional[str] = MISSING
    noise_snr: List[float] = checked(Each(Range(-20.0, 60.0), nonempty=True))
    noise_prob: float = checked(PROBABILITY)
    num_workers: int = checked(AT_LEAST_0)
    log_with: str = checked(OneOf(trackers))


@dataclasses.dataclass
class EvalConfig:
    """conf/eval/default.yaml: `evaluate` (and the split `baseline` scores)."""

    split: str = MISSING
    results_dir: str = MISSING
    max_batch_seconds: float = checked(POSITIVE)
    max_batch_size: int = checked(AT_LEAST_1)
    lm: Optional[str] = MISSING
    backend: str = checked(OneOf(BACKENDS))
    quantize: Optional[str] = checked(OneOf(QUANTIZE))
    device: str = checked(Device())


@dataclasses.dataclass
class BaselineConfig:
    """conf/baseline/*.yaml: a zero-shot baseline (Whisper, omniASR-CTC, MMS or the omniASR LLM)."""

    family: str = checked(OneOf(BASELINE_FAMILIES))
    name_or_path: str = MISSING
    license: str = MISSING
    language: str = MISSING
    num_beams: int = checked(AT_LEAST_1)
    batch_size: int = checked(AT_LEAST_1)
    max_new_tokens: int = checked(AT_LEAST_1)
    dtype: str = checked(OneOf(BASELINE_DTYPES))
    quantize: Optional[str] = checked(OneOf(BASELINE_QUANTIZE))
    min_coverage: float = checked(PROBABILITY)
    random_standin: bool = MISSING
    results_dir: str = MISSING
    device: str = checked(Device())


@dataclasses.dataclass
class TranscribeConfig:
    """conf/config.yaml `transcribe:`: audio files or folders to txt, json and srt."""

    inputs: List[str] = MISSING
    output_dir: str = MISSING
    chunk_seconds: float = checked(POSITIVE)
    overlap_seconds: float = checked(AT_LEAST_0)
    batch_size: Any = checked(AutoOr(AT_LEAST_1))
    formats: List[str] = checked(Each(OneOf(TRANSCRIPT_FORMATS), nonempty=True))
    device: str = checked(Device())
    backend: str = checked(OneOf(BACKENDS))
    quantize: Optional[str] = checked(OneOf(QUANTIZE))
    lm: Optional[str] = MISSING
    beam_width: Optional[int] = checked(AT_LEAST_1)
    srt_max_seconds: float = checked(POSITIVE)
    srt_max_chars: int = checked(AT_LEAST_1)
    srt_max_gap: float = checked(AT_LEAST_0)


@dataclasses.dataclass
class ServeConfig:
    """conf/config.yaml `serve:`: the HTTP API and try-it page (`w2vbert-asr serve`, serve.py)."""

    host: str = MISSING
    port: int = checked(Range(0, 65535))
    api_key: Optional[str] = MISSING
    allow_anonymous: bool = MISSING
    model_name: Optional[str] = MISSING
    max_batch: int = checked(AT_LEAST_1)
    max_wait_ms: float = checked(AT_LEAST_0)
    queue_size: int = checked(AT_LEAST_0)
    max_upload_mb: float = checked(POSITIVE)
    timeout_s: float = checked(POSITIVE)


@dataclasses.dataclass
class PseudolabelConfig:
    """conf/config.yaml `pseudolabel:`: label an unlabelled pool for self-training."""

    pool: str = MISSING
    audio_column: str = MISSING
    threshold: float = checked(PROBABILITY)
    filter: str = checked(OneOf(PSEUDO_FILTERS))
    min_alignment: float = MISSING
    max_clips: Optional[int] = checked(AT_LEAST_1)
    output_dir: str = MISSING
    batch_size: int = checked(AT_LEAST_1)
    device: str = checked(Device())
    lm: Optional[str] = MISSING


@dataclasses.dataclass
class SelfTrainingConfig:
    """conf/config.yaml `self_training:`: the rounds `pseudolabel` runs with thresholds."""

    thresholds: List[float] = checked(Each(PROBABILITY))
    restart: bool = MISSING
    max_ratio: Optional[float] = checked(POSITIVE)
    lm: bool = MISSING


@dataclasses.dataclass
class ConfidenceConfig:
    """conf/config.yaml `confidence:`: word and utterance confidence from CTC posteriors."""

    measure: str = checked(OneOf(CONFIDENCE_MEASURES))
    alpha: float = checked(POSITIVE)
    normalization: str = checked(OneOf(CONFIDENCE_NORMALIZATIONS))
    word_aggregation: str = checked(OneOf(CONFIDENCE_AGGREGATIONS))
    utterance_aggregation: str = checked(OneOf(CONFIDENCE_AGGREGATIONS))


@dataclasses.dataclass
class LMConfig:
    """conf/config.yaml `lm:`: the n-gram built from the training text, and its beam search."""

    order: int = checked(Range(*LM_ORDERS))
    output_dir: str = MISSING
    alpha: float = MISSING
    beta: float = MISSING
    beam_width: int = checked(AT_LEAST_1)
    text: Optional[str] = MISSING


@dataclasses.dataclass
class Int8Config:
    """conf/config.yaml `export.int8:`: onnxruntime dynamic quantisation."""

    weight_type: str = checked(OneOf(INT8_WEIGHT_TYPES))
    per_channel: bool = MISSING
    op_types: List[str] = checked(NONEMPTY)


@dataclasses.dataclass
class ExportConfig:
    """conf/config.yaml `export:`: the ONNX files `export` writes."""

    quantize: Optional[str] = checked(OneOf(QUANTIZE))
    opset: int = checked(AT_LEAST_1)
    dynamo: bool = MISSING
    optimize: str = checked(OneOf(OPTIMIZE_LEVELS))
    int8: Int8Config = MISSING
    output_dir: Optional[str] = MISSING  # null: <model_dir>/onnx


@dataclasses.dataclass
class PushConfig:
    """conf/config.yaml `push:`: the Hub upload and its model card."""

    repo_id: Optional[str] = MISSING
    private: bool = MISSING
    dry_run: bool = MISSING
    license: str = MISSING
    staging_dir: str = MISSING
    commit_message: str = MISSING
    after_train: bool = MISSING
    datasets: List[str] = MISSING
    dataset_name: Optional[str] = MISSING
    command: Optional[str] = MISSING  # the train command sets it at run time (cli.run)


@dataclasses.dataclass
class CompareConfig:
    """conf/config.yaml `compare:`: side-by-side results with bootstrap intervals."""

    runs: List[str] = MISSING
    split: str = MISSING
    output_dir: str = MISSING
    top_disagreements: int = checked(AT_LEAST_0)
    bootstrap_samples: int = checked(AT_LEAST_1)
    confidence: float = checked(Range(0, 1, low_open=True, high_open=True))
    seed: int = MISSING
    min_speakers: int = checked(AT_LEAST_1)


@dataclasses.dataclass
class BakeoffConfig:
    """conf/config.yaml `bakeoff:`: the zero-shot baselines and fine-tuned backbones `bakeoff` compares."""

    baselines: List[str] = MISSING  # conf/baseline/<name>.yaml options (an unknown one fails composing)
    backbones: List[str] = MISSING  # conf/model/<name>.yaml options
    output_dir: str = MISSING
    overrides: List[str] = MISSING  # set when bakeoff is called from Python; the CLI's own are read from Hydra


@dataclasses.dataclass
class SynthConfig:
    """conf/config.yaml `synth:`: the synthetic corpus."""

    num_clips: int = checked(AT_LEAST_1)
    num_unlabelled: int = checked(AT_LEAST_0)
    faulty_fraction: float = checked(Range(0, 1))
    output_dir: Optional[str] = MISSING  # ${data.root}, which a manifest source may leave null
    overwrite: bool = MISSING


@dataclasses.dataclass
class AuditConfig:
    """conf/config.yaml `audit:`: score every clip's transcript against its audio (audit.py)."""

    splits: Optional[List[str]] = MISSING
    folds: int = checked(AT_LEAST_0)
    threshold: float = MISSING
    worst: int = checked(AT_LEAST_0)
    output_dir: str = MISSING
    max_batch_seconds: float = checked(POSITIVE)
    max_batch_size: int = checked(AT_LEAST_1)
    device: str = checked(Device())


@dataclasses.dataclass
class Config:
    """conf/config.yaml: the whole composed config. `data` is typed by the source its option names
    (CommonVoiceData, HFData or ManifestData) and left open here, so code may replace the section with a
    resolved plain dict (the self-training rounds do)."""

    data: Any = MISSING
    text: TextConfig = MISSING
    model: ModelConfig = MISSING
    train: TrainConfig = MISSING
    eval: EvalConfig = MISSING
    baseline: BaselineConfig = MISSING
    lang: str = MISSING
    output_dir: str = MISSING
    model_dir: str = MISSING
    seed: int = MISSING
    resume: bool = MISSING
    transcribe: TranscribeConfig = MISSING
    serve: ServeConfig = MISSING
    pseudolabel: PseudolabelConfig = MISSING
    self_training: SelfTrainingConfig = MISSING
    confidence: ConfidenceConfig = MISSING
    lm: LMConfig = MISSING
    export: ExportConfig = MISSING
    push: PushConfig = MISSING
    compare: CompareConfig = MISSING
    synth: SynthConfig = MISSING
    bakeoff: BakeoffConfig = MISSING
    audit: AuditConfig = MISSING


# Schema name (under the ConfigStore group `schema`) -> dataclass; conf/ names them in its defaults lists.
SCHEMAS = {"config": Config, "text": TextConfig, "model": ModelConfig, "train": TrainConfig, "eval": EvalConfig,
           "baseline": BaselineConfig, "data/common": DataConfig, "data/commonvoice": CommonVoiceData,
           "data/hf": HFData, "data/manifest": ManifestData}


def register() -> None:
    """Store the schemas in Hydra's ConfigStore (idempotent: a second store replaces the first)."""
    store = ConfigStore.instance()
    for name, schema in SCHEMAS.items():
        group, _, leaf = f"schema/{name}".rpartition("/")
        store.store(group=group, name=leaf, node=schema)


register()
