"""`torch.compile` of the training step: captured whole, one graph per padded width, compiled up
front, and watched for recompiles.

The unit compiled is the loop's step module (forward + loss of one micro-batch, a fixed signature:
`input_ids, attention_mask, labels`), with `fullgraph=True`: PEFT's and Transformers' Python
around the backbone call is traced once per width instead of being split at graph breaks and
re-guarded per call site (Transformers 5 wraps layer forwards in `deprecate_kwarg`, which
recompiles per call site once a graph breaks around it). Training batches are padded to a few
fixed widths (`compile_widths`); `CompiledStep.warm_up` compiles each before the first step. A
compile after warm-up would mean a guard no one planned for: it is refused (that step runs
eagerly, counted and named once in the run's output), never a recompile storm with a screenful of
dynamo warnings. Evaluation and prediction run the plain model, eagerly: their batches have free
shapes and eval mode would be another graph. Where a model cannot be captured whole, the step
runs eagerly and the reason is one line.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
from torch import nn

from budgetlora.runtime import autocast

CompileSetting = Union[bool, str]

# padded training widths under torch.compile: each is one compiled graph, so keep the set small
_COMPILE_WIDTHS = (32, 64, 96, 128, 192, 256, 384, 512)
_RECOMPILE_REFUSED = "Detected recompile"  # the message torch raises under the fail_on_recompile stance


def resolve_compile(setting: CompileSetting, device: torch.device) -> bool:
    """`train.compile`: auto compiles on CUDA only. On CPU the compile (minutes on 2 cores) did not
    pay back on the machines measured (docs/speed.md)."""
    if setting == "auto":
        return device.type == "cuda"
    return bool(setting)


def compile_widths(max_length: int) -> tuple[int, ...]:
    """The few padded widths a compiled model sees: fixed buckets up to `max_length` (rounded up to
    a multiple of 8), so every batch lands on an already compiled shape."""
    top = -(-max_length // 8) * 8
    return tuple(w for w in _COMPILE_WIDTHS if w < top) + (top,)


@dataclass
class CompileReport:
    """What compiling cost and whether it held: graphs and seconds of the warm-up, compiles asked
    for after it (each refused: that step ran eagerly), and why the step runs eagerly, if it does."""

    widths: tuple[int, ...] = ()
    graphs: int = 0
    seconds: float = 0.0
    recompiles: int = 0
    first_recompile: Optional[str] = None
    failure: Optional[str] = None

    @property
    def compiled(self) -> bool:
        return self.failure is None

    def describe(self) -> str:
        if self.failure is not None:
            return f"compile: not used ({self.failure}); training eagerly"
        text = f"compile: {self.graphs} graph(s) for widths {'/'.join(map(str, self.widths))} in {self.seconds:.1f} s"
        if self.recompiles:
            text += f"; {self.recompiles} step(s) asked for a recompile and ran eagerly (first: {self.first_recompile})"
        return text

    def as_dict(self) -> dict[str, Any]:
        return {
            "widths": list(self.widths),
            "graphs": self.graphs,
            "seconds": round(self.seconds, 3),
            "recompiles": self.recompiles,
            "failure": self.failure,
        }


@dataclass
class _EventCounter:
    """Dynamo's compile-start/end events (its callback hook): captured graphs counted, every
    compile (forward and backward) timed."""

    graphs: int = 0
    seconds: float = 0.0
    _started: list = field(default_factory=list)

    def start(self, _args: Any) -> None:
        self._started.append(time.perf_counter())

    def end(self, args: Any) -> None:
        from torch._dynamo.callback import CallbackTrigger

        if self._started:
            self.seconds += time.perf_counter() - self._started.pop()
        # a frame dynamo captured; the backward graph compiled at the first backward is its pair
        self.graphs += getattr(args, "callback_trigger", CallbackTrigger.DYNAMO) == CallbackTrigger.DYNAMO


@contextlib.contextmanager
def counting_compiles() -> Iterator[_EventCounter]:
    from torch._dynamo.callback import callback_handler

    counter = _EventCounter()
    callback_handler.register_start_callback(counter.start)
    callback_handler.register_end_callback(counter.end)
    try:
        yield counter
    finally:
        callback_handler.remove_start_callback(counter.start)
        callback_handler.remove_end_callback(counter.end)


def _first_line(exc: BaseException, limit: int = 200) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:limit] if text else ''}"


class CompiledStep:
    """Calls a step module compiled with `fullgraph=True` for fixed widths (see the module
    docstring); `module` is the step itself or its DDP wrapper."""

    def __init__(self, step: nn.Module, widths: Sequence[int], backend: Optional[str] = None):
        self.step = step
        self.report = CompileReport(widths=tuple(widths))
        self.backend = backend or "inductor"
        self._warm = False

    def compile(self) -> None:
        import torch._dynamo

        # compiled graphs of earlier runs in this process (tests, sweeps, notebooks) would count
        # against this run's recompile limit and keep their models alive
        torch._dynamo.reset()
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, len(self.report.widths) + 2)
        self.step.compile(fullgraph=True, dynamic=False, backend=self.backend)

    def warm_up(
        self, batches: Iterable[dict[str, torch.Tensor]], device: torch.device, precision: str
    ) -> CompileReport:
        """One forward + backward per width; the global RNG (data order, dropout) is left as it
        was, gradients are dropped and parameters are unchanged. A model that cannot be captured
        whole is left eager, with the reason in the report."""
        self.compile()
        was_training = self.step.training
        self.step.train()
        devices = [device] if device.type == "cuda" else []
        with counting_compiles() as counter, torch.random.fork_rng(devices=devices):
            try:
                for batch in batches:
                    with autocast(device, precision):
                        loss, _ = self.step(**{k: v.to(device) for k, v in batch.items()})
                    loss.backward()
            except Exception as exc:  # noqa: BLE001 - a graph break under fullgraph, or a backend that cannot build
                self.uncompile()
                self.report.failure = _first_line(exc)
        for param in self.step.parameters():
            param.grad = None
        self.step.train(was_training)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.report.graphs, self.report.seconds = counter.graphs, counter.seconds
        self._warm = self.report.compiled
        return self.report

    def uncompile(self) -> None:
        self.step._compiled_call_impl = None

    def __call__(self, module: nn.Module, **inputs: torch.Tensor) -> Any:
        if not self._warm:
            return module(**inputs)
        try:
            with torch.compiler.set_stance("fail_on_recompile"):
                return module(**inputs)
        except RuntimeError as exc:
            if _RECOMPILE_REFUSED not in str(exc):
                raise
            self.report.recompiles += 1
            if self.report.first_recompile is None:
                reason = [line.strip() for line in str(exc).splitlines() if line.strip().startswith("- ")]
                self.report.first_recompile = (reason[0][2:] if reason else _first_line(exc))[:200]
        with torch.compiler.set_stance("force_eager"):
            return module(**inputs)


def warm_up_batches(
    widths: Sequence[int], rows: int, token_ids: torch.Tensor, labels: torch.Tensor, pad_id: int, segments: bool = False
) -> list[dict[str, torch.Tensor]]:
    """A batch per width, shaped as training batches are: `rows` rows of real token ids (the last
    row half padding), real labels and, for text pairs, segment ids, so dtypes and shapes match the
    steps to come."""
    generator = torch.Generator().manual_seed(0)
    batches = []
    for width in widths:
        pick = torch.randint(0, len(token_ids), (rows, width), generator=generator)
        ids = token_ids[pick].long()
        mask = torch.ones(rows, width, dtype=torch.long)
        mask[-1, max(1, width // 2) :] = 0
        ids[-1, max(1, width // 2) :] = pad_id
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels[:rows].clone()}
        if segments:
            types = torch.zeros(rows, width, dtype=torch.long)
            types[:, width // 2 :] = 1
            batch["token_type_ids"] = types * mask
        batches.append(batch)
    return batches
