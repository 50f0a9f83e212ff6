"""Faults injected at the training loop's hook points (`train.TrainHooks`) and the export's
(`export.ExportHooks`), for the tests that kill runs.

Usage:
    python tests/faults.py <faults> <override> ...        # train(compose(overrides)) with the faults
    accelerate launch --multi_gpu --num_processes 2 tests/faults.py nonfinite@2:1:1 recipe=demo ...
    python tests/faults.py export kill@moved:2 lang=model model_dir=<dir> ...   # export(compose(overrides))

<faults> is comma-separated:
    kill@step:N         SIGKILL this process after optimizer step N
    kill@checkpoint:N   SIGKILL it inside the write of checkpoint N (after the state, before the rename)
    kill@model          SIGKILL it inside the write of model/ (before the rename)
    nonfinite@N:K:R     the loss of micro-batch K (0-based) of step N on process R is NaN
For export, one fault:
    kill@POINT[:N]      SIGKILL it the N-th time (default 1) the export reaches POINT (ExportHooks lists them)
"""

from __future__ import annotations

import logging
import os
import signal
import sys

from w2vbert_asr.export import ExportHooks
from w2vbert_asr.train import TrainHooks


def _kill() -> None:
    logging.shutdown()
    os.kill(os.getpid(), signal.SIGKILL)


class FaultHooks(TrainHooks):
    def __init__(self, spec: str):
        self.kills: dict[str, int | None] = {}
        self.nan: dict[tuple[int, int], set[int]] = {}
        for item in filter(None, spec.split(",")):
            kind, _, where = item.partition("@")
            if kind == "kill":
                point, _, step = where.partition(":")
                self.kills[point] = int(step) if step else None
            elif kind == "nonfinite":
                step, micro, rank = (int(x) for x in where.split(":"))
                self.nan.setdefault((step, rank), set()).add(micro)
            else:
                raise ValueError(f"unknown fault {item!r}")

    def _maybe_kill(self, point: str, step: int | None = None) -> None:
        if point in self.kills and self.kills[point] in (None, step):
            _kill()

    def after_step(self, step: int) -> None:
        self._maybe_kill("step", step)

    def during_checkpoint(self, step: int) -> None:
        self._maybe_kill("checkpoint", step)

    def during_model_save(self) -> None:
        self._maybe_kill("model")

    def poisoned(self, step: int, rank: int) -> frozenset[int]:
        return frozenset(self.nan.get((step, rank), ()))


class ExportFaults(ExportHooks):
    def __init__(self, spec: str):
        kind, _, where = spec.partition("@")
        if kind != "kill":
            raise ValueError(f"unknown export fault {spec!r}")
        point, _, nth = where.partition(":")
        self.point, self.nth, self.seen = point, int(nth or 1), 0

    def reached(self, point: str) -> None:
        if point == self.point:
            self.seen += 1
            if self.seen == self.nth:
                _kill()


if __name__ == "__main__":
    from w2vbert_asr.cli import compose

    if sys.argv[1] == "export":
        from w2vbert_asr.export import export

        export(compose(sys.argv[3:]), ExportFaults(sys.argv[2]))
    else:
        from w2vbert_asr.train import train

        train(compose(sys.argv[2:]), FaultHooks(sys.argv[1]))
