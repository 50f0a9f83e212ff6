"""The onnxruntime backend: an exported model (`w2vbert-asr export`) behind the torch model's interface.

`OnnxCTCModel(...)(input_features=..., attention_mask=...).logits` and `.config` are what the Transcriber
(chunking, LM beam search, word timestamps, SRT) and evaluate's decoding loop use, so they run unchanged
on either backend. onnxruntime runs on the CPU here; the logits come back as a torch tensor on the
device of the features. `load_onnx_model` serves only a complete export made from the weights the model
folder holds now (`check_export`, against the record `export` writes last); anything else is one
UsageError naming the export command.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import UsageError
from .export import INT8_FILE, RECORD, export_command, model_files, onnx_file
from .model import check_model_dir
from .storage import stamp_changed

BACKENDS = ("torch", "onnx")


@dataclass
class OnnxOutput:
    logits: torch.Tensor  # (B, T', V) float32
    output_lengths: torch.Tensor  # (B,) int64: FrameGeometry.output_frames of each clip


class OnnxCTCModel:
    """An ONNX CTC graph in an onnxruntime CPU session.

    path: the .onnx file; config: the model's config (frame geometry, vocab size);
    threads: onnxruntime intra-op threads (0: onnxruntime's default, one per physical core).
    """

    training = False

    def __init__(self, path: str | Path, config, threads: int = 0):
        import onnxruntime as ort

        self.path, self.config = Path(path), config
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])

    def __call__(self, **inputs: torch.Tensor) -> OnnxOutput:
        """The graph's inputs by name (the featurizer's model_inputs: W2v-BERT's input_features (B, T, 160) and
        attention_mask (B, T), or omniASR's input_values (B, 1, N) and padding_mask (B, N)) -> OnnxOutput with
        logits on the inputs' device. Masks go in as int64, values as float32."""
        feeds = {i.name: inputs[i.name].detach().to("cpu", torch.int64 if "int" in i.type else torch.float32).numpy()
                 for i in self.session.get_inputs()}
        logits, lengths = self.session.run(None, feeds)
        device = next(iter(inputs.values())).device
        return OnnxOutput(torch.from_numpy(logits).to(device), torch.from_numpy(np.asarray(lengths)))

    # The torch model's housekeeping calls, so callers need not know the backend.
    def to(self, *_, **__) -> "OnnxCTCModel":
        return self

    def eval(self) -> "OnnxCTCModel":
        return self

    def train(self, mode: bool = True) -> "OnnxCTCModel":
        if mode:
            raise RuntimeError("an ONNX model cannot be trained")
        return self

    def num_parameters(self) -> int:
        """Weights in the graph (int8 weights count once, like fp32 ones)."""
        import onnx

        model = onnx.load(str(self.path), load_external_data=False)
        return int(sum(np.prod(t.dims) for t in model.graph.initializer if len(t.dims) > 0))


def load_onnx_model(model_dir: str | Path, quantize: str | None = None, threads: int = 0,
                    output_dir: str | Path | None = None) -> OnnxCTCModel:
    """The exported graph of a local model folder (`<dir>/onnx/model.onnx`, or model.int8.onnx for
    quantize=int8; in `output_dir` when it was exported there: export.output_dir), with the folder's config.
    A folder without it, or whose export is incomplete or older than the model's weights
    (`check_export`), is a UsageError naming the command."""
    from transformers import AutoConfig

    model_dir = Path(model_dir)
    path = onnx_file(model_dir, quantize, output_dir)
    command = export_command(model_dir, path.parent, quantize)
    check_export(model_dir, path, command)
    config = AutoConfig.from_pretrained(str(model_dir))
    try:
        return OnnxCTCModel(path, config, threads)
    except Exception as e:  # onnxruntime's InvalidProtobuf, Fail, ...: one line, not its traceback
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UsageError(f"onnxruntime cannot load {path} ({why}); run `{command}` again") from e


def check_export(model_dir: Path, path: Path, command: str) -> None:
    """Refuse (UsageError naming `command`) an export folder without `path`, without its record (a killed
    export, or one older than the record), with files that differ from the record (cut short, damaged), or
    made from other model files than `model_dir` holds now. Costs a stat per file while nothing changed."""
    folder = path.parent
    record_file = folder / RECORD
    if not path.is_file() and not record_file.is_file():
        int8 = path.name == INT8_FILE
        raise UsageError(f"{path} not found: {model_dir} has no ONNX export{' in int8' if int8 else ''}; run "
                         f"`{command}` first (or use the torch backend)")
    try:
        record = json.loads(record_file.read_text())
    except (OSError, ValueError):
        raise UsageError(f"{folder} holds an incomplete export (no readable {RECORD}: the export was interrupted, "
                         f"or made by an older version); run `{command}` again") from None
    files, made_from = record.get("files") or {}, record.get("made_from") or {}
    if path.name not in files:
        raise UsageError(f"{path} not found: the export in {folder} has no {path.name}; run `{command}` first")
    for name in (path.name, path.name + ".data"):
        why = stamp_changed(folder / name, files[name]) if name in files else ""
        if why:
            raise UsageError(f"{folder / name} is incomplete or damaged ({why} differs from {RECORD}); "
                             f"run `{command}` again")
    for name in sorted(set(made_from) | set(model_files(model_dir))):
        why = stamp_changed(model_dir / name, made_from[name]) if name in made_from else "new file"
        if why:
            raise UsageError(f"the ONNX export in {folder} is stale: {model_dir / name} changed since it was made "
                             f"({why}); run `{command}` again")


def check_backend(backend: str | None) -> str:
    backend = str(backend or "torch")
    if backend not in BACKENDS:
        raise UsageError(f"backend {backend!r}: choose torch or onnx")
    return backend


def local_model_dir(ref: str | Path) -> Path:
    """The ONNX backend reads a local folder (the Hub's copy has onnx/ too: download it first)."""
    path = Path(ref)
    if not path.is_dir():
        raise UsageError(f"the onnx backend needs a local model folder, {ref!r} is not one; download it (e.g. "
                         f"`hf download {ref} --local-dir <dir>`) and pass model=<dir>, or use the torch backend")
    return check_model_dir(path)
