"""Process-level helpers that capture, the codec library and training share: the device a run
uses, dtype names, host-to-device copies that do not wait, the stop signals, and seconds per
stage.

The lowest layer: it imports nothing of kdpipe, so its errors are ``ValueError`` with a
message a stage wraps into its own error type (naming its option).
"""

from __future__ import annotations

import signal
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                                  "float16": torch.float16, "float64": torch.float64}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a dtype name as datasets, configs and options spell it."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unsupported dtype {name!r}; use one of {sorted(DTYPES)}") from None


def auto_dtype(device: torch.device | str) -> str:
    """What ``auto`` precision means on ``device``: bfloat16 on a GPU, float32 elsewhere."""
    return "bfloat16" if torch.device(device).type == "cuda" else "float32"


def resolve_device(name: str, *, local_rank: int | None = None) -> torch.device:
    """``auto``: the GPU when CUDA is available, else the CPU. Under torchrun (``local_rank``
    given) a bare ``cuda`` is this process's GPU, ``cuda:LOCAL_RANK``. A GPU with an index is
    made current, so that kernels launched without a device argument (Triton's, NCCL's) run
    on it. Raises ValueError when CUDA is asked for and missing."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"{name!r} is not a device (use auto, cpu, cuda or cuda:N)") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{name!r}: CUDA is not available on this machine")
        if device.index is None and local_rank is not None:
            device = torch.device("cuda", local_rank)
        if device.index is not None:
            torch.cuda.set_device(device)
    return device


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``t``, built on the host, on ``device``. To a GPU it goes from page-locked memory, so
    the copy is queued on the current stream: a copy from pageable memory would first wait for
    everything queued before it, and the host would stop running ahead of the GPU."""
    device = torch.device(device)
    if device.type != "cuda" or t.is_cuda:
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


class Interrupted(BaseException):
    """A stop signal that acts at once: it unwinds the stack, so writers abort and only work
    already committed remains. A BaseException, so that no ``except Exception`` swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopSignals:
    """SIGTERM (a scheduler's preemption notice) and SIGINT (Ctrl-C) as a request to stop at
    the loop's next safe point (capture: the end of the window; training: the step every rank
    agrees on), so the run exits resumable instead of dying mid-write.

    While ``graceful`` (set once the loop can stop cleanly) the first signal only sets
    ``signum`` and calls ``notice``; a second one, or one before ``graceful``, raises
    ``Interrupted`` at once. The handlers in place before are then restored, so a further
    signal acts as it would without kdpipe (e.g. kills a process stuck in native code)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, *, graceful: bool = False,
                 notice: Callable[[signal.Signals], None] | None = None) -> None:
        self.graceful = graceful
        self.notice = notice
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> StopSignals:
        self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum is not None or not self.graceful:
            self._restore()
            raise Interrupted(signum)
        self.signum = signum
        if self.notice is not None:
            self.notice(signal.Signals(signum))

    def _restore(self) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        self._previous = {}

    def __exit__(self, *exc) -> None:
        self._restore()


class StageTimes:
    """Wall seconds per named stage, summed over calls; threads may add to it concurrently
    (stages that run in several threads at once then sum to more than the wall time)."""

    def __init__(self) -> None:
        self._seconds: dict[str, float] = defaultdict(float)
        self._lock = threading.Lock()

    @contextmanager
    def time(self, stage: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, time.perf_counter() - t0)

    def add(self, stage: str, seconds: float) -> None:
        with self._lock:
            self._seconds[stage] += seconds

    def as_dict(self) -> dict[str, float]:
        with self._lock:
            return dict(self._seconds)
