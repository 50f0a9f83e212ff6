"""Export a trained CTC model to ONNX for CPU inference with onnxruntime, optionally with int8 weights.

Usage:
    w2vbert-asr export model=demo_out/model                          # -> demo_out/model/onnx/model.onnx
    w2vbert-asr export model=demo_out/model export.quantize=int8     # also onnx/model.int8.onnx
    w2vbert-asr transcribe model=demo_out/model transcribe.backend=onnx export.quantize=int8 talk.wav
    w2vbert-asr evaluate model=demo_out/model eval.backend=onnx

The graph takes our log-mel features and their mask and returns the logits and each clip's CTC frame
count, so any onnxruntime program can decode a batch without this package:
    input_features  (B, T, 160) float32    BatchFeatureExtractor / Wav2Vec2BertProcessor output
    attention_mask  (B, T) int64
    logits          (B, T', V) float32
    output_lengths  (B,) int64             = features.ctc_output_frames(samples) of each clip
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
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

import torch
from omegaconf import DictConfig

from . import UsageError
from .features import FEATURE_STRIDE
from .model import use_fast_relative_key_bias

log = logging.getLogger(__name__)

ONNX_DIR = "onnx"
FP32_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
INPUT_NAMES = ("input_features", "attention_mask")
OUTPUT_NAMES = ("logits", "output_lengths")
PROTOBUF_LIMIT = 2 * 10**9 - 2**20  # bytes: protobuf refuses messages of 2 GiB; leave room for the graph
QUANTIZE_CHOICES = (None, "none", "int8")


def onnx_file(model_dir: str | Path, quantize: str | None = None) -> Path:
    """The ONNX file of a model folder for `export.quantize` (none/null: fp32, int8: the int8 file)."""
    if quantize not in QUANTIZE_CHOICES:
        raise UsageError(f"export.quantize={quantize!r}: choose null (fp32) or int8")
    return Path(model_dir) / ONNX_DIR / (INT8_FILE if quantize == "int8" else FP32_FILE)


# --------------------------------------------------------------------------------------------- graph
class CTCWithLengths(torch.nn.Module):
    """(input_features (B, T, 160), attention_mask (B, T)) -> (logits (B, T', V), output_lengths (B,)).

    output_lengths is `features.ctc_output_frames` of each clip, computed from what the graph sees: the
    extractor's mask marks a stacked frame valid when its second fbank frame is real, so a clip with an
    odd fbank count has one more stacked frame, half real, half `padding_value`. That frame follows the
    last masked one; it counts when its first fbank frame (the first 80 values) is not all padding.
    Then the adapter's convolutions shorten the count as transformers computes it.
    """

    def __init__(self, model, padding_value: float = 0.0):
        super().__init__()
        self.model = model
        self.padding_value = float(padding_value)
        cfg = model.config
        self.adapter = [(int(cfg.adapter_kernel_size), int(cfg.adapter_stride))] * int(cfg.num_adapter_layers) \
            if getattr(cfg, "add_adapter", False) else []

    def forward(self, input_features: torch.Tensor, attention_mask: torch.Tensor):
        logits = self.model(input_features=input_features, attention_mask=attention_mask).logits
        masked = attention_mask.sum(-1)  # (B,) stacked frames whose second fbank frame is real
        steps = input_features.shape[1]
        bins = input_features.shape[2] // FEATURE_STRIDE
        nxt = masked.clamp(max=steps - 1)  # the frame after the masked ones (clamped: gather needs an index)
        first = torch.gather(input_features[:, :, :bins], 1, nxt[:, None, None].expand(-1, 1, bins))  # (B, 1, 80)
        half = (first != self.padding_value).any(-1).squeeze(1) & (masked < steps)
        frames = masked + half.to(masked.dtype)
        for kernel, stride in self.adapter:
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


def export_onnx(model, path: str | Path, padding_value: float = 0.0, opset: int = 17, dynamo: bool = False) -> Path:
    """Write `model` (a Wav2Vec2BertForCTC with padding hooks, eval mode) as ONNX at `path`, with dynamic batch
    and time axes; weights in `<name>.data` next to it when the graph would exceed 2 GB. -> path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for old in (path, path.with_name(path.name + ".data")):
        old.unlink(missing_ok=True)
    wrapper = CTCWithLengths(model.eval(), padding_value).eval()
    args = _dummy_inputs(padding_value, int(model.config.feature_projection_input_dim))
    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    external = n_bytes > PROTOBUF_LIMIT
    with torch.no_grad(), export_rewrites(model):
        if dynamo:
            batch, time_ = torch.export.Dim("batch"), torch.export.Dim("time")
            onnx_program = torch.onnx.export(
                wrapper, args, dynamo=True, input_names=list(INPUT_NAMES), output_names=list(OUTPUT_NAMES),
                dynamic_shapes=({0: batch, 1: time_}, {0: batch, 1: time_}), opset_version=max(opset, 18),
                optimize=True)
            onnx_program.save(str(path), external_data=external)
        else:
            torch.onnx.export(
                wrapper, args, str(path), dynamo=False, input_names=list(INPUT_NAMES),
                output_names=list(OUTPUT_NAMES), opset_version=opset, do_constant_folding=True,
                dynamic_axes={"input_features": {0: "batch", 1: "time"}, "attention_mask": {0: "batch", 1: "time"},
                              "logits": {0: "batch", 1: "frames"}, "output_lengths": {0: "batch"}},
                external_data=external)
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
def export_model_dir(model_dir: str | Path, ecfg: DictConfig | dict) -> dict:
    """Export a saved model folder into `<model_dir>/onnx/` as `ecfg` (the `export:` config block) says.
    -> {"fp32": path, "int8": path or None, sizes, seconds}"""
    from transformers import Wav2Vec2BertProcessor

    from .model import load_ctc_model

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise UsageError(f"{model_dir} is not a model folder (no config.json); pass model=<trained model dir>")
    quantize = ecfg.get("quantize")
    onnx_file(model_dir, quantize)  # validates the choice before minutes of work
    padding_value = float(Wav2Vec2BertProcessor.from_pretrained(str(model_dir)).feature_extractor.padding_value)
    model = load_ctc_model(model_dir, "cpu")
    out = model_dir / ONNX_DIR
    start = time.perf_counter()
    fp32 = export_onnx(model, out / FP32_FILE, padding_value, int(ecfg.get("opset", 17)), bool(ecfg.get("dynamo")))
    del model
    level = str(ecfg.get("optimize") or "none")
    if level != "none":
        optimize_offline(fp32, level)
    result = {"fp32": str(fp32), "fp32_bytes": onnx_size(fp32), "int8": None}
    if quantize == "int8":
        q = ecfg.get("int8") or {}
        int8 = quantize_int8(fp32, out / INT8_FILE, str(q.get("weight_type", "QInt8")), bool(q.get("per_channel")),
                             list(q.get("op_types") or ["MatMul"]))
        result.update(int8=str(int8), int8_bytes=onnx_size(int8))
    result["seconds"] = time.perf_counter() - start
    for kind in ("fp32", "int8"):
        if result[kind]:
            print(f"{kind}: {result[kind]} ({result[kind + '_bytes'] / 1e6:.1f} MB)")
    print(f"exported in {result['seconds']:.1f} s; run it with transcribe.backend=onnx"
          + (" export.quantize=int8" if quantize == "int8" else ""))
    return result


def export(cfg: DictConfig) -> dict:
    """`w2vbert-asr export model=<dir> [export.quantize=int8]`."""
    return export_model_dir(cfg.model_dir, cfg.export)
