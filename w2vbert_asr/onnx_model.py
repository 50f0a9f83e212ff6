"""The onnxruntime backend: an exported model (`w2vbert-asr export`) behind the torch model's interface.

`OnnxCTCModel(...)(input_features=..., attention_mask=...).logits` and `.config` are what the Transcriber
(chunking, LM beam search, word timestamps, SRT) and evaluate's decoding loop use, so they run unchanged
on either backend. onnxruntime runs on the CPU here; the logits come back as a torch tensor on the
device of the features.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import UsageError
from .export import INT8_FILE, ONNX_DIR, onnx_file

BACKENDS = ("torch", "onnx")


@dataclass
class OnnxOutput:
    logits: torch.Tensor  # (B, T', V) float32
    output_lengths: torch.Tensor  # (B,) int64: features.ctc_output_frames of each clip


class OnnxCTCModel:
    """An ONNX CTC graph in an onnxruntime CPU session.

    path: the .onnx file; config: the model's Wav2Vec2BertConfig (frame geometry, vocab size);
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

    def __call__(self, input_features: torch.Tensor, attention_mask: torch.Tensor, **_) -> OnnxOutput:
        """input_features (B, T, 160), attention_mask (B, T) -> OnnxOutput with logits on the features' device."""
        feeds = {"input_features": input_features.detach().to("cpu", torch.float32).numpy(),
                 "attention_mask": attention_mask.detach().to("cpu", torch.int64).numpy()}
        logits, lengths = self.session.run(None, feeds)
        return OnnxOutput(torch.from_numpy(logits).to(input_features.device), torch.from_numpy(np.asarray(lengths)))

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


def load_onnx_model(model_dir: str | Path, quantize: str | None = None, threads: int = 0) -> OnnxCTCModel:
    """The exported graph of a local model folder (`<dir>/onnx/model.onnx`, or model.int8.onnx for
    quantize=int8), with the folder's config; a folder without it is a UsageError naming the command."""
    from transformers import Wav2Vec2BertConfig

    model_dir = Path(model_dir)
    path = onnx_file(model_dir, quantize)
    if not path.is_file():
        extra = " export.quantize=int8" if path.name == INT8_FILE else ""
        raise UsageError(f"{path} not found: {model_dir} has no ONNX export{' in int8' if extra else ''}; run "
                         f"`w2vbert-asr export model={model_dir}{extra}` first (or use the torch backend)")
    return OnnxCTCModel(path, Wav2Vec2BertConfig.from_pretrained(str(model_dir)), threads)


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
    if not (path / ONNX_DIR).is_dir() and not (path / "config.json").is_file():
        raise UsageError(f"{path} is not a model folder (no config.json)")
    return path
