"""The omniASR LLM part of `w2vbert-asr baseline` (baseline.py holds the shared path).

`OmniASRForConditionalGeneration` (a wav2vec2-style encoder feeding a Llama decoder) is asked for a transcript with
the language code (`processor.apply_transcription_request(audio, language=...)`; `languages.omniasr_language`
maps the recipe's code to `<iso639-3>_<script>` among the checkpoint's own language tokens) and decodes greedily
(baseline.num_beams for beams), batches left-padded, longest clips first.

Memory: the 7B model's weights take ~17 GB in bfloat16, more than a 16 GB card. Before loading, the weights are
counted from the config (on the meta device, nothing allocated) and compared with the device's free memory; if
they do not fit, one error line says what does: `baseline.quantize=8bit` (or 4bit) loads the weights through
bitsandbytes (`pip install bitsandbytes`, CUDA), or `baseline.device=cpu` runs it in RAM (slowly).
"""

from __future__ import annotations

import os
import re
import time

import numpy as np
import torch

from . import UsageError
from .audio import waves_of
from .geometry import SAMPLING_RATE
from .languages import omniasr_language

SYSTEM = "omniasr-llm"
LANGUAGE_TOKEN = re.compile(r"^<\|lang:(.+)\|>$")
AGNOSTIC = "auto"  # the language-agnostic mode's token, not a language
QUANT_BYTES = {None: None, "8bit": 1.0, "4bit": 0.5}  # bytes per weight under bitsandbytes
HEADROOM = 1.15  # activations, the decoder's cache and the CUDA context on top of the weights
GB = 1e9


def weight_bytes(name_or_path: str, dtype: torch.dtype, quantize: str | None) -> tuple[float, int]:
    """-> (bytes the weights take, parameter count), counted from the config on the meta device."""
    from transformers import AutoConfig, OmniASRForConditionalGeneration

    config = AutoConfig.from_pretrained(name_or_path)
    with torch.device("meta"):
        params = sum(p.numel() for p in OmniASRForConditionalGeneration(config).parameters())
    per = QUANT_BYTES[quantize] or torch.tensor([], dtype=dtype).element_size()
    return params * per, params


def free_bytes(device: torch.device) -> float:
    if device.type == "cuda":
        return float(torch.cuda.mem_get_info(device)[0])
    return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def check_fits(name_or_path: str, device: torch.device, dtype: torch.dtype, quantize: str | None) -> None:
    """One UsageError when the weights (with HEADROOM) do not fit the device's free memory, naming what fits."""
    need, params = weight_bytes(name_or_path, dtype, quantize)
    free = free_bytes(device)
    if need * HEADROOM <= free:
        return
    dtype_name = str(dtype).removeprefix("torch.")
    how = f"{quantize} weights" if quantize else dtype_name
    offers = []
    if device.type == "cuda":
        offers += [f"baseline.quantize={q} (bitsandbytes, ~{params * b * HEADROOM / GB:.1f} GB)"
                   for q, b in QUANT_BYTES.items() if b and q != quantize and params * b * HEADROOM <= free]
        cpu_free = free_bytes(torch.device("cpu"))
        if params * 2 * HEADROOM <= cpu_free:
            offers.append(f"baseline.device=cpu baseline.dtype=bfloat16 (~{params * 2 * HEADROOM / GB:.1f} GB of the "
                          f"{cpu_free / GB:.0f} GB of free RAM; slow)")
    offer = ("; what fits: " + " or ".join(offers)) if offers else "; a machine with more memory is needed"
    raise UsageError(f"{name_or_path} ({params / 1e9:.1f}B parameters) needs ~{need * HEADROOM / GB:.1f} GB in "
                     f"{how}, {device} has {free / GB:.1f} GB free{offer}")


def load(name_or_path: str, device: torch.device, dtype: torch.dtype, bcfg):
    from transformers import OmniASRForConditionalGeneration, OmniASRProcessor

    quantize = bcfg.quantize
    kwargs: dict = {"dtype": dtype, "use_safetensors": True}
    if quantize:
        if device.type != "cuda":
            raise UsageError(f"baseline.quantize={quantize} loads the weights through bitsandbytes on a CUDA GPU; "
                             f"{device} is not one: set baseline.quantize=null")
        try:
            from transformers import BitsAndBytesConfig
            import bitsandbytes  # noqa: F401
        except ImportError as e:
            raise UsageError(f"baseline.quantize={quantize} needs bitsandbytes: pip install 'w2vbert-asr[quant]' "
                             "(or pip install bitsandbytes)") from e
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_8bit=quantize == "8bit", load_in_4bit=quantize == "4bit", bnb_4bit_compute_dtype=dtype)
        kwargs["device_map"] = {"": device.index or 0}
    try:
        check_fits(name_or_path, device, dtype, quantize)
        processor = OmniASRProcessor.from_pretrained(name_or_path)
        model = OmniASRForConditionalGeneration.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError) as e:
        raise UsageError(f"could not load an omniASR LLM checkpoint from {name_or_path!r} ({type(e).__name__}: "
                         f"{str(e).splitlines()[0]}). Set baseline.name_or_path to a Hub id or a local folder holding "
                         "config.json, the safetensors weights and the processor files") from e
    processor.tokenizer.padding_side = "left"  # a decoder-only model continues each prompt from its right end
    return (model if quantize else model.to(device)).eval(), processor


def language(code: str, model, processor, name_or_path: str) -> dict:
    available = [m.group(1) for m in map(LANGUAGE_TOKEN.match, processor.tokenizer.get_vocab()) if m]
    return {"code": omniasr_language(code, [a for a in available if a != AGNOSTIC], name_or_path)}


@torch.no_grad()
def transcribe(model, processor, dataset, cfg, device: torch.device, dtype: torch.dtype,
               lang: dict) -> tuple[list[str], float, dict]:
    """-> (texts in dataset order, wall seconds, metrics.json header entries)."""
    bcfg = cfg.baseline
    order = np.argsort(-np.asarray(dataset["duration"], dtype=np.float64), kind="stable")
    texts: dict[int, str] = {}
    generate = {"max_new_tokens": int(bcfg.max_new_tokens), "num_beams": int(bcfg.num_beams), "do_sample": False}
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for b in range(0, len(order), int(bcfg.batch_size)):
        idx = [int(i) for i in order[b:b + int(bcfg.batch_size)]]
        inputs = processor.apply_transcription_request(
            waves_of(dataset[i]["audio"] for i in idx), language=lang["code"],
            processor_kwargs={"return_tensors": "pt", "padding": True, "sampling_rate": SAMPLING_RATE})
        inputs = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in inputs.items()
                  if k not in processor.unused_input_names}
        out = model.generate(**inputs, **generate)
        new = out[:, inputs["input_ids"].shape[1]:]  # the prompt is left-padded to one length
        texts.update(zip(idx, processor.batch_decode(new, skip_special_tokens=True)))
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    header = {"language": lang["code"], "num_beams": int(bcfg.num_beams), "max_new_tokens": int(bcfg.max_new_tokens),
              "quantize": bcfg.quantize}
    return [texts[i] for i in range(len(dataset))], seconds, header
