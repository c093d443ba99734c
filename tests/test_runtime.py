"""The process-level helpers both stages share: stop signals, device, dtypes, stage seconds;
and that capture records its stages."""

from __future__ import annotations

import signal
import threading

import pytest
import torch

from kdpipe.runtime import (Interrupted, StageTimes, StopSignals, auto_dtype, resolve_device,
                            torch_dtype)
from tests.helpers import write_jsonl


def test_first_signal_requests_a_stop_the_second_interrupts_and_restores_the_handlers():
    before = {s: signal.getsignal(s) for s in StopSignals.SIGNALS}
    seen = []
    with StopSignals(graceful=True, notice=seen.append) as stop:
        signal.raise_signal(signal.SIGTERM)
        assert stop.signum == signal.SIGTERM and seen == [signal.SIGTERM]
        with pytest.raises(Interrupted) as e:
            signal.raise_signal(signal.SIGINT)
        assert e.value.signum == signal.SIGINT and str(e.value) == "SIGINT"
        assert {s: signal.getsignal(s) for s in StopSignals.SIGNALS} == before
    assert {s: signal.getsignal(s) for s in StopSignals.SIGNALS} == before


def test_a_signal_before_the_graceful_phase_interrupts_at_once():
    with StopSignals() as stop:
        with pytest.raises(Interrupted) as e:
            signal.raise_signal(signal.SIGTERM)
        assert e.value.signum == signal.SIGTERM and stop.signum is None


def test_device_and_dtype_names():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="not a device"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda", local_rank=1)
    assert torch_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(ValueError, match="unsupported dtype 'int4'"):
        torch_dtype("int4")
    assert auto_dtype("cpu") == "float32" and auto_dtype("cuda:1") == "bfloat16"


def test_stage_times_sum_over_threads():
    times = StageTimes()

    def work():
        for _ in range(1000):
            times.add("encode", 0.001)
    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with times.time("write"):
        pass
    got = times.as_dict()
    assert got["encode"] == pytest.approx(4.0) and 0 <= got["write"] < 1


def test_capture_records_its_stages(tmp_path, teacher_dir):
    from kdpipe.capture.run import CaptureOptions, run_capture

    data = write_jsonl(tmp_path / "in.jsonl", [{"text": f"record {i} of a few"} for i in range(6)])
    s = run_capture(CaptureOptions(model=str(teacher_dir), data=str(data),
                                   out=str(tmp_path / "ds"), top_k=4, hidden_layers="1",
                                   window=2, device="cpu", dtype="float32", progress=False))
    assert s.complete and s.documents == 6
    assert {"read", "tokenize", "forward", "write_window", "encode_topk", "encode_hidden",
            "parquet", "commit"} <= set(s.stages)
    assert all(v >= 0 for v in s.stages.values())
    assert s.stages["forward"] < s.seconds
