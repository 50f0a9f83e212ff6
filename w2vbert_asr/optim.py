"""The optimizer of a training run: AdamW, without weight decay on biases and norms.

Usage:
    from w2vbert_asr.optim import make_optimizer
    optimizer = make_optimizer(model, cfg.train)
"""

from __future__ import annotations

import torch

from . import UsageError

# train.adamw_impl -> torch.optim.AdamW arguments
ADAMW_IMPLS = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for_loop": {"foreach": False}}


def make_optimizer(model, tcfg) -> torch.optim.Optimizer:
    # No weight decay on biases and norms: decaying them only hurts (standard transformer practice).
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": tcfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    impl = str(tcfg.adamw_impl)
    if impl not in ADAMW_IMPLS:
        raise UsageError(f"train.adamw_impl={impl!r}: use one of {', '.join(ADAMW_IMPLS)}")
    # fused: one kernel over all parameters (CUDA and CPU); foreach: one op per step for all tensors;
    # for_loop: one op per tensor (torch's CPU default). Same update up to rounding.
    return torch.optim.AdamW(groups, lr=tcfg.learning_rate, betas=tuple(tcfg.adam_betas), eps=tcfg.adam_eps,
                             **ADAMW_IMPLS[impl])
