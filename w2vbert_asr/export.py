"""Export a trained CTC model to ONNX for CPU inference with onnxruntime, optionally with int8 weights.

Usage:
    w2vbert-asr export model=demo_out/model                          # -> demo_out/model/onnx/model.onnx
    w2vbert-asr export model=demo_out/model export.quantize=int8     # also onnx/model.int8.onnx
    w2vbert-asr transcribe model=demo_out/model transcribe.backend=onnx export.quantize=int8 talk.wav
    w2vbert-asr evaluate model=demo_out/model eval.backend=onnx
    w2vbert-asr export model=/ro/model export.output_dir=onnx_sw   # a model folder we cannot write into:
    w2vbert-asr transcribe model=/ro/model transcribe.backend=onnx export.output_dir=onnx_sw talk.wav

The graph takes our log-mel features and their mask and returns the logits and each clip's CTC frame
count, so any onnxruntime program can decode a batch without this package:
    input_features  (B, T, 160) float32    BatchFeatureExtractor / Wav2Vec2BertProcessor output
    attention_mask  (B, T) int64
    logits          (B, T', V) float32
    output_lengths  (B,) int64             = FrameGeometry.output_frames(samples) of each clip
Batch and time are dynamic axes. Weights go to external data (`model.onnx.data`) when the graph would
pass protobuf's 2 GB limit (the 600M model). The padding hooks (model.attach_padding_hooks) are traced
into the graph, so a padded batch gives the logits that torch gives.

Steps: torch's TorchScript exporter (export.dynamo=true: the dynamo exporter, same graph speed, ~10x
slower to export, needs onnxscript), with two exact rewrites that onnxruntime runs faster
(`export_rewrites`: the relative-position bias as a MatMul + Gather, pointwise convolutions as MatMuls);
then onnxruntime's offline graph optimisation (export.optimize: constant folding, redundant nodes)
written back as the model file; then, with export.quantize=int8, onnxruntime's dynamic quantisation
(int8 weights, activations quantised per batch at run time) of the operators in export.int8.op_types.
What was measured for each choice: benchmarks/README.md.

Integrity: every file is written in a staging folder inside the export folder and moved into place when
all are complete; `export.json` (RECORD), written last, holds each file's size and hash, what the export
was made from (config.json and the weights, by size, time and hash) and the export settings. The onnx
backend (onnx_model.load_onnx_model) refuses a folder whose record is missing, whose files differ from it
(a kill mid-export, a truncated copy) or whose model files changed since, naming the export command; so
after a kill -9 at any point the next load either works or says to export again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path

import torch

from . import UsageError
from .geometry import FrameGeometry
from .model import check_model_dir, use_fast_relative_key_bias
from .storage import atomic_write_json, disk_full_guard, file_stamp, fresh_dir, remove_paths

log = logging.getLogger(__name__)

ONNX_DIR = "onnx"
FP32_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
INPUT_NAMES = ("input_features", "attention_mask")
OUTPUT_NAMES = ("logits", "output_lengths")
PROTOBUF_LIMIT = 2 * 10**9 - 2**20  # bytes: protobuf refuses messages of 2 GiB; leave room for the graph
QUANTIZE_CHOICES = (None, "none", "int8")
RECORD = "export.json"  # written last: what the export holds and was made from
STAGING = ".staging"  # inside the export folder, so that it is on the same file system and under its lock
# Every file an export may write; a new export removes the ones it does not write (an older int8 file).
EXPORT_FILES = (FP32_FILE, FP32_FILE + ".data", INT8_FILE, INT8_FILE + ".data")


def onnx_dir(model_dir: str | Path, output_dir: str | Path | None = None) -> Path:
    """Where the export of `model_dir` lives: `export.output_dir` when set, else <model_dir>/onnx."""
    return Path(output_dir) if output_dir else Path(model_dir) / ONNX_DIR


def onnx_file(model_dir: str | Path, quantize: str | None = None, output_dir: str | Path | None = None) -> Path:
    """The ONNX file of a model folder for `export.quantize` (none/null: fp32, int8: the int8 file)."""
    if quantize not in QUANTIZE_CHOICES:
        raise UsageError(f"export.quantize={quantize!r}: choose null (fp32) or int8")
    return onnx_dir(model_dir, output_dir) / (INT8_FILE if quantize == "int8" else FP32_FILE)


def export_command(model_dir: str | Path, folder: str | Path, quantize: str | None = None) -> str:
    """The command that writes the export `folder` of `model_dir`, for messages."""
    elsewhere = Path(folder) != Path(model_dir) / ONNX_DIR
    return (f"w2vbert-asr export model={model_dir}" + (f" export.output_dir={folder}" if elsewhere else "")
            + (" export.quantize=int8" if quantize == "int8" else ""))


def model_files(model_dir: str | Path) -> list[str]:
    """The files of a model folder an export is made from: config.json and the weights."""
    return ["config.json", *sorted(p.name for p in Path(model_dir).glob("*.safetensors"))]


class ExportHooks:
    """Points of `export_model_dir` where tests inject faults (tests/faults.py kills the process there):
    "exported", "optimized", "quantized" (each file complete in the staging folder), "unpublished" (the old
    record removed), "moved" (after each file moved into place), "recorded". The defaults do nothing."""

    def reached(self, point: str) -> None:
        pass


# --------------------------------------------------------------------------------------------- graph
class CTCWithLengths(torch.nn.Module):
    """(input_features (B, T, 160), attention_mask (B, T)) -> (logits (B, T', V), output_lengths (B,)).

    output_lengths is `FrameGeometry.output_frames` of each clip, computed from what the graph sees: the
    extractor's mask marks a stacked frame valid when its second fbank frame is real, so a clip with an
    odd fbank count has one more stacked frame, half real, half `padding_value`. That frame follows the
    last masked one; it counts when its first fbank frame (the first 80 values) is not all padding.
    Then the adapter's convolutions shorten the count as transformers computes it.
    """

    def __init__(self, model, padding_value: float = 0.0):
        super().__init__()
        self.model = model
        self.padding_value = float(padding_value)
        self.geometry = FrameGeometry.of(model.config)

    def forward(self, input_features: torch.Tensor, attention_mask: torch.Tensor):
        logits = self.model(input_features=input_features, attention_mask=attention_mask).logits
        masked = attention_mask.sum(-1)  # (B,) stacked frames whose second fbank frame is real
        steps = input_features.shape[1]
        bins = input_features.shape[2] // self.geometry.stack
        nxt = masked.clamp(max=steps - 1)  # the frame after the masked ones (clamped: gather needs an index)
        first = torch.gather(input_features[:, :, :bins], 1, nxt[:, None, None].expand(-1, 1, bins))  # (B, 1, 80)
        half = (first != self.padding_value).any(-1).squeeze(1) & (masked < steps)
        frames = masked + half.to(masked.dtype)
        kernel, stride = self.geometry.adapter_kernel, self.geometry.adapter_stride
        for _ in range(self.geometry.adapter_layers):
            # floor((n + 2 * (stride // 2) - kernel) / stride) + 1, kept non-negative so that ONNX's
            # truncating integer division equals floor division.
            frames = torch.div((frames + 2 * (stride // 2) - kernel + stride).clamp(min=0), stride,
                               rounding_mode="floor")
        return logits, frames


class PointwiseMatMul(torch.nn.Module):
    """A kernel-1 Conv1d `(B, C, T) -> (B, C', T)` as a MatMul with the weight as its constant second
    input: the same numbers, but onnxruntime's dynamic quantisation handles MatMul well (MatMulInteger)
    and ConvInteger slowly. The Conformer's pointwise convolutions hold 1/8 of the 600M weights."""

    def __init__(self, conv: torch.nn.Conv1d):
        super().__init__()
        self.conv = conv  # shares the parameters; nothing is copied

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.matmul(x.transpose(1, 2), self.conv.weight[:, :, 0].t())
        if self.conv.bias is not None:
            y = y + self.conv.bias
        return y.transpose(1, 2)


@contextlib.contextmanager
def pointwise_convs_as_matmul(model):
    """Swap every kernel-1, stride-1, ungrouped Conv1d of `model` for `PointwiseMatMul` while exporting."""
    swapped = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Conv1d) and child.kernel_size == (1,) and child.stride == (1,) \
                    and child.groups == 1 and child.padding in ((0,), "valid"):
                setattr(parent, name, PointwiseMatMul(child))
                swapped.append((parent, name, child))
    try:
        yield model
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)


@contextlib.contextmanager
def export_rewrites(model):
    """The graph-friendly forms used while exporting: `pointwise_convs_as_matmul` and
    `model.relative_key_bias` (a MatMul + Gather instead of an Einsum over an (Lq, Lk, D) table)."""
    fast = [getattr(m, "_w2vbert_fast_bias", False) for m in model.modules() if hasattr(m, "distance_embedding")]
    use_fast_relative_key_bias(model)
    try:
        with pointwise_convs_as_matmul(model):
            yield model
    finally:
        for m, was in zip((m for m in model.modules() if hasattr(m, "distance_embedding")), fast):
            m._w2vbert_fast_bias = was


def _dummy_inputs(padding_value: float, bins2: int = 160) -> tuple[torch.Tensor, torch.Tensor]:
    """A padded batch of two clips (odd and even fbank counts) to trace with."""
    feats = torch.randn(2, 50, bins2)
    mask = torch.ones(2, 50, dtype=torch.long)
    feats[1, 30:] = padding_value
    feats[1, 29, bins2 // 2:] = padding_value  # odd fbank count: half a stacked frame
    mask[1, 29:] = 0
    return feats, mask


def _graph(model, padding_value: float) -> tuple[torch.nn.Module, tuple, tuple[str, ...], dict]:
    """-> (module to trace, inputs to trace with, input names, dynamic axes) of a CTC model's family: W2v-BERT's
    features and mask (CTCWithLengths), or omniASR's samples and mask (omniasr.OnnxGraph)."""
    if model.config.model_type == "omniasr_ctc":
        from .omniasr import OnnxGraph

        return OnnxGraph(model).eval(), OnnxGraph.dummy_inputs(), OnnxGraph.input_names, OnnxGraph.dynamic_axes
    axes = {"input_features": {0: "batch", 1: "time"}, "attention_mask": {0: "batch", 1: "time"},
            "logits": {0: "batch", 1: "frames"}, "output_lengths": {0: "batch"}}
    return (CTCWithLengths(model, padding_value).eval(),
            _dummy_inputs(padding_value, int(model.config.feature_projection_input_dim)), INPUT_NAMES, axes)


def export_onnx(model, path: str | Path, padding_value: float = 0.0, opset: int = 17, dynamo: bool = False) -> Path:
    """Write `model` (a Wav2Vec2BertForCTC with padding hooks, or an OmniASRForCTC; eval mode) as ONNX at `path`,
    with dynamic batch and time axes; weights in `<name>.data` next to it when the graph would exceed 2 GB.
    -> path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for old in (path, path.with_name(path.name + ".data")):
        old.unlink(missing_ok=True)
    wrapper, args, input_names, axes = _graph(model.eval(), padding_value)
    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    external = n_bytes > PROTOBUF_LIMIT
    with torch.no_grad(), export_rewrites(model):
        if dynamo:
            dims = {"batch": torch.export.Dim("batch"), "time": torch.export.Dim("time")}
            shapes = tuple({i: dims["batch" if name == "batch" else "time"] for i, name in axes[n].items()}
                           for n in input_names)
            onnx_program = torch.onnx.export(
                wrapper, args, dynamo=True, input_names=list(input_names), output_names=list(OUTPUT_NAMES),
                dynamic_shapes=shapes, opset_version=max(opset, 18), optimize=True)
            onnx_program.save(str(path), external_data=external)
        else:
            torch.onnx.export(
                wrapper, args, str(path), dynamo=False, input_names=list(input_names),
                output_names=list(OUTPUT_NAMES), opset_version=opset, do_constant_folding=True,
                dynamic_axes=axes, external_data=external)
    if external:
        _gather_external_data(path)
    return path


def _gather_external_data(path: Path) -> None:
    """TorchScript export of a > 2 GB model writes one file per tensor next to the graph; rewrite them into
    a single `<name>.data` file and delete the loose ones."""
    import onnx

    before = {p for p in path.parent.iterdir()} - {path}
    model = onnx.load(str(path), load_external_data=True)
    path.unlink()
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=1024)
    for p in before:
        if p.is_file() and p.name != path.name + ".data":
            p.unlink()


def optimize_offline(path: str | Path, level: str = "extended") -> Path:
    """Run onnxruntime's graph optimisations (`basic`: constant folding and redundant nodes, portable;
    `extended`: also CPU fusions such as LayerNorm/GELU/MatMul+Add) once and write the result back over
    `path`, so sessions start from the optimised graph. -> path"""
    import onnxruntime as ort

    path = Path(path)
    levels = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED}
    if level not in levels:
        raise UsageError(f"export.optimize={level!r}: choose none, basic or extended")
    data = path.with_name(path.name + ".data")
    external = data.is_file()
    tmp = path.with_name(path.stem + ".opt.onnx")
    so = ort.SessionOptions()
    so.graph_optimization_level = levels[level]
    so.optimized_model_filepath = str(tmp)
    if external:
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", tmp.name + ".data")
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    tmp.replace(path)
    if external:
        # The optimised graph names its data file after the temporary name: rename the file back
        # and point the graph at it.
        import onnx

        model = onnx.load(str(path), load_external_data=False)
        for tensor in _external_tensors(model):
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = data.name
        onnx.save_model(model, str(path))
        path.with_name(tmp.name + ".data").replace(data)
    return path


def _external_tensors(model):
    import onnx

    for tensor in onnx.external_data_helper._get_all_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            yield tensor


def quantize_int8(fp32_path: str | Path, int8_path: str | Path, weight_type: str = "QInt8",
                  per_channel: bool = False, op_types: list[str] | tuple[str, ...] = ("MatMul",)) -> Path:
    """onnxruntime dynamic quantisation: int8 weights of `op_types` nodes, activations quantised per batch at
    run time. weight_type QInt8 or QUInt8. -> int8_path"""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    types = {"QInt8": QuantType.QInt8, "QUInt8": QuantType.QUInt8}
    if weight_type not in types:
        raise UsageError(f"export.int8.weight_type={weight_type!r}: choose QInt8 or QUInt8")
    fp32_path, int8_path = Path(fp32_path), Path(int8_path)
    int8_path.parent.mkdir(parents=True, exist_ok=True)
    for old in (int8_path, int8_path.with_name(int8_path.name + ".data")):
        old.unlink(missing_ok=True)
    external = fp32_path.with_name(fp32_path.name + ".data").is_file()
    quantize_dynamic(str(fp32_path), str(int8_path), weight_type=types[weight_type], per_channel=bool(per_channel),
                     op_types_to_quantize=list(op_types), use_external_data_format=external,
                     extra_options={"MatMulConstBOnly": True})
    if external and int8_path.stat().st_size < PROTOBUF_LIMIT:
        # int8 weights of the 600M model fit in one file: fold the external data back in.
        import onnx

        model = onnx.load(str(int8_path), load_external_data=True)
        int8_path.with_name(int8_path.name + ".data").unlink(missing_ok=True)
        onnx.save_model(model, str(int8_path), save_as_external_data=False)
    return int8_path


def onnx_size(path: str | Path) -> int:
    """Bytes of an ONNX file plus its external data file, if any."""
    path = Path(path)
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.is_file() else 0)


# --------------------------------------------------------------------------------------------- command
def export_model_dir(model_dir: str | Path, ecfg, hooks: ExportHooks | None = None) -> dict:
    """Export a saved model folder into export.output_dir (default `<model_dir>/onnx/`) as `ecfg` (the `export:`
    config block) says; files appear there only complete, with their record (see Integrity above).
    -> {"fp32": path, "int8": path or None, sizes, seconds}"""
    model_dir = check_model_dir(model_dir, "export")
    hooks = hooks or ExportHooks()
    quantize = ecfg.quantize
    out = onnx_dir(model_dir, ecfg.output_dir)
    onnx_file(model_dir, quantize)  # validates the choice before minutes of work
    padding_value = _padding_value(model_dir)
    made_from = {name: file_stamp(model_dir / name) for name in model_files(model_dir)}  # before reading them
    start = time.perf_counter()
    staging = _staging(out)
    with disk_full_guard(out, cleanup=[staging], advice="then export again"):
        _build(model_dir, ecfg, staging, padding_value, hooks)
        files = {name: file_stamp(staging / name) for name in EXPORT_FILES if (staging / name).is_file()}
        _publish(staging, out, {"made_from": made_from, "settings": _settings(ecfg), "files": files}, hooks)
    result = {"fp32": str(out / FP32_FILE), "fp32_bytes": onnx_size(out / FP32_FILE), "int8": None}
    if quantize == "int8":
        result.update(int8=str(out / INT8_FILE), int8_bytes=onnx_size(out / INT8_FILE))
    result["seconds"] = time.perf_counter() - start
    for kind in ("fp32", "int8"):
        if result[kind]:
            print(f"{kind}: {result[kind]} ({result[kind + '_bytes'] / 1e6:.1f} MB)")
    print(f"exported in {result['seconds']:.1f} s; run it with transcribe.backend=onnx"
          + (f" export.output_dir={out}" if out != model_dir / ONNX_DIR else "")
          + (" export.quantize=int8" if quantize == "int8" else ""))
    return result


def _padding_value(model_dir: Path) -> float:
    """The feature extractor's padding value; a folder without the processor files is one UsageError."""
    from .families import load_processor

    try:
        return float(load_processor(model_dir).feature_extractor.padding_value)
    except (OSError, ValueError) as e:
        raise UsageError(f"{model_dir} has no processor files (vocab.json, tokenizer_config.json, "
                         "processor_config.json); export the model folder that `train` writes, which holds them, "
                         "or copy them there from the run's processor/") from e


def _staging(out: Path) -> Path:
    """An empty staging folder inside `out` (what a killed export left there is removed)."""
    try:
        return fresh_dir(out / STAGING)
    except OSError as e:
        raise UsageError(f"cannot write into {out} ({e.strerror}); set export.output_dir=<a folder you can write> "
                         "(and the same export.output_dir for the onnx backend)") from e


def _build(model_dir: Path, ecfg, staging: Path, padding_value: float, hooks: ExportHooks) -> None:
    """Every file of the export, complete, in `staging`."""
    from .model import load_ctc_model

    model = load_ctc_model(model_dir, "cpu")
    fp32 = export_onnx(model, staging / FP32_FILE, padding_value, int(ecfg.opset), bool(ecfg.dynamo))
    del model
    hooks.reached("exported")
    if str(ecfg.optimize) != "none":
        optimize_offline(fp32, str(ecfg.optimize))
        hooks.reached("optimized")
    if ecfg.quantize == "int8":
        q = ecfg.int8
        quantize_int8(fp32, staging / INT8_FILE, str(q.weight_type), bool(q.per_channel), list(q.op_types))
        hooks.reached("quantized")


def _settings(ecfg) -> dict:
    """How the export was made (the `export:` block without where it went)."""
    from omegaconf import OmegaConf

    settings = OmegaConf.to_container(ecfg, resolve=True) if OmegaConf.is_config(ecfg) else dict(ecfg)
    settings.pop("output_dir", None)
    return settings


def _publish(staging: Path, out: Path, record: dict, hooks: ExportHooks) -> None:
    """Move the complete export from `staging` into `out`. The old record goes first: from then until the new
    one is written the folder is refused as incomplete, so a kill at any moment leaves an export that loads
    (the old one or the new one) or one refused with the command to run."""
    (out / RECORD).unlink(missing_ok=True)
    hooks.reached("unpublished")
    for name in EXPORT_FILES:
        if (staging / name).is_file():
            os.replace(staging / name, out / name)  # a rename keeps the size and time the record holds
            hooks.reached("moved")
        else:
            (out / name).unlink(missing_ok=True)  # an older export's file that this one does not make
    atomic_write_json(out / RECORD, record)
    hooks.reached("recorded")
    remove_paths([staging])


def export(cfg, hooks: ExportHooks | None = None) -> dict:
    """`w2vbert-asr export model=<dir> [export.quantize=int8] [export.output_dir=<dir>]`."""
    return export_model_dir(cfg.model_dir, cfg.export, hooks)
