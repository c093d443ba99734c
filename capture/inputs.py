"""Input records: reading text datasets and turning records into token sequences.

Sources: JSONL, JSON, Parquet or CSV files, a directory of them (sorted, recursive),
a ``datasets`` dataset saved with ``save_to_disk``, or a hub dataset id. Every record
gets a global index in source order; ``--num-shards N --shard-index I`` gives record
i to part i % N, so N processes read disjoint parts of the same input.

A bad record (undecodable bytes, malformed JSON, missing or empty field) becomes a
``BadRecord`` that capture counts and skips; a source that cannot be read at all, or
whose records never have the requested field, fails immediately with its name.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from kdpipe.schemas import ConfigError

EXTENSIONS = (".jsonl", ".json", ".parquet", ".csv")
FIELD_PROBE = 64  # records inspected before a missing field is declared a wrong --text-field
UTF8_BOM = b"\xef\xbb\xbf"
FINGERPRINT_BYTES = 1 << 16   # bytes hashed at each end of every input file


@dataclass
class BadRecord:
    reason: str      # the skip category counted in the manifest
    where: str = ""  # file:line, where the reader knows it


@dataclass
class Tokenized:
    input_ids: np.ndarray            # [T] int32
    loss_mask: np.ndarray | None     # [T] bool: row t (predicting token t+1) is trained on


def _iter_jsonl(path: Path) -> Iterator[dict | BadRecord]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if lineno == 1:
                raw = raw.removeprefix(UTF8_BOM)  # editors on Windows write one
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                yield BadRecord("undecodable bytes", where)
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                yield BadRecord("malformed json", where)
                continue
            yield rec if isinstance(rec, dict) else BadRecord("record is not an object", where)


def _iter_json(path: Path) -> Iterator[dict | BadRecord]:
    try:
        data = json.loads(path.read_bytes().removeprefix(UTF8_BOM).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not a readable JSON file: {e}") from e
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise ConfigError(f"{path}: expected a JSON list of records (or {{'data': [...]}})")
    for i, rec in enumerate(data):
        yield rec if isinstance(rec, dict) else BadRecord("record is not an object",
                                                          f"{path}: item {i}")


def _iter_table(table) -> Iterator[dict]:
    for batch in table.to_batches(max_chunksize=1024):
        yield from batch.to_pylist()


def _iter_file(path: Path) -> Iterator[dict | BadRecord]:
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            yield from _iter_jsonl(path)
        elif suffix == ".json":
            yield from _iter_json(path)
        elif suffix == ".parquet":
            import pyarrow.parquet as pq
            yield from _iter_table(pq.read_table(path))
        elif suffix == ".csv":
            import pyarrow.csv as pacsv
            yield from _iter_table(pacsv.read_csv(path))
        else:
            raise ConfigError(f"{path}: unsupported file type (use {', '.join(EXTENSIONS)})")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e}") from e
    except ConfigError:
        raise
    except Exception as e:  # pyarrow raises its own types for malformed files
        raise ConfigError(f"{path}: cannot read: {e}") from e


def _iter_hf(source: str, split: str) -> Iterator[dict]:
    import datasets
    path = Path(source)
    if path.is_dir():
        ds = datasets.load_from_disk(str(path))
    else:
        ds = datasets.load_dataset(source, split=split)
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ConfigError(f"{source}: no split {split!r} (has {sorted(ds)})")
        ds = ds[split]
    yield from ds


def _is_saved_hf_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_info.json").exists() or
                              (path / "dataset_dict.json").exists() or
                              (path / "state.json").exists())


def source_files(source: str) -> list[Path]:
    path = Path(source)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in EXTENSIONS)
        if not files:
            raise ConfigError(f"{source}: directory holds no {'/'.join(EXTENSIONS)} files")
        return files
    return []


def _is_local(source: str) -> bool:
    """Whether ``source`` names a local path rather than a hub dataset id."""
    return Path(source).exists() or source.startswith((".", "/", "~")) or \
        source.lower().endswith(EXTENSIONS)


def check_source(source: str) -> None:
    """Fail now, before any model is loaded, if a local input is missing or unreadable."""
    if not _is_local(source):
        return   # a hub dataset id: `datasets` reports its own errors
    path = Path(source)
    if not path.exists():
        raise ConfigError(f"--data {source}: no such file or directory")
    files = [path] if path.is_file() else \
        [p for p in path.rglob("*") if p.is_file()] if _is_saved_hf_dataset(path) else \
        source_files(source)
    for f in files:
        try:
            with open(f, "rb") as fh:
                fh.read(1)
        except OSError as e:
            raise ConfigError(f"--data {f}: cannot read: {e.strerror or e}") from e


def source_identity(source: str) -> tuple[str, str]:
    """(normalized name, content fingerprint) of an input, so that a rerun recognizes the
    same input however its path is spelled, and notices when its content changed.

    A local input is named by its resolved absolute path. Its fingerprint hashes, for every
    file read (sorted, relative to the input), the relative name, the size, and the first
    and last FINGERPRINT_BYTES bytes: cheap for any size, independent of mtimes (a copied
    input still matches), and it sees appended, truncated or rewritten files; an edit inside
    a large file that keeps its size and both ends is not seen. A hub id is its own name and
    has no fingerprint (empty)."""
    if not _is_local(source):
        return source, ""
    path = Path(source).resolve()
    files = [path] if path.is_file() else \
        sorted(p for p in path.rglob("*") if p.is_file()) if _is_saved_hf_dataset(path) else \
        source_files(str(path))
    digest = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        with open(f, "rb") as fh:
            head = fh.read(FINGERPRINT_BYTES)
            fh.seek(max(size - FINGERPRINT_BYTES, 0))
            tail = fh.read(FINGERPRINT_BYTES)
        rel = f.name if f == path else f.relative_to(path).as_posix()
        digest.update(json.dumps([rel, size]).encode())
        digest.update(hashlib.sha256(head).digest() + hashlib.sha256(tail).digest())
    return str(path), digest.hexdigest()


def count_records(source: str) -> int | None:
    """Records in a local JSONL or Parquet input (cheap: lines, or Parquet metadata);
    None where counting would mean parsing everything (JSON, CSV) or for a hub id."""
    if not _is_local(source) or _is_saved_hf_dataset(Path(source)):
        return None
    total = 0
    for f in source_files(source):
        suffix = f.suffix.lower()
        if suffix == ".parquet":
            import pyarrow.parquet as pq
            total += pq.ParquetFile(f).metadata.num_rows
        elif suffix == ".jsonl":
            with open(f, "rb") as fh:
                total += sum(1 for line in fh if line.strip())
        else:
            return None
    return total


def iter_records(source: str, *, split: str = "train") -> Iterator[dict | BadRecord]:
    """Every record of the source in a stable order."""
    path = Path(source)
    if _is_saved_hf_dataset(path):
        yield from _iter_hf(source, split)
        return
    files = source_files(source)
    if files:
        for f in files:
            yield from _iter_file(f)
        return
    if _is_local(source):
        raise ConfigError(f"{source}: no such file or directory")
    yield from _iter_hf(source, split)  # a hub dataset id


def iter_part(source: str, *, text_field: str, num_parts: int, part: int,
              start: int = 0, limit: int | None = None, split: str = "train"
              ) -> Iterator[tuple[int, dict | BadRecord]]:
    """(global index, record) for the records of one part, from ``start`` on.

    Checks ``text_field`` on the first records of the whole source: if none of them has
    it (nor chat ``messages``), the field name is wrong and that is an error, not a skip.
    """
    seen_field, probed, available = False, 0, set()
    for i, rec in enumerate(iter_records(source, split=split)):
        if limit is not None and i >= limit:
            break
        if not seen_field and isinstance(rec, dict):
            probed += 1
            available.update(rec)
            if text_field in rec or "messages" in rec:
                seen_field = True
            elif probed >= FIELD_PROBE:
                break
        if i < start or i % num_parts != part:
            continue
        yield i, rec
    if not seen_field and probed:
        raise ConfigError(f"{source}: no record has the field {text_field!r} or 'messages' "
                          f"(fields seen: {sorted(available)}); set --text-field")


def doc_id(index: int, rec: dict, text_field: str) -> str:
    content = rec.get("messages") if "messages" in rec and text_field not in rec \
        else rec.get(text_field)
    digest = hashlib.sha256(json.dumps(content, sort_keys=True, ensure_ascii=False)
                            .encode()).hexdigest()[:12]
    return f"{index:09d}-{digest}"


def tokenize_record(rec: dict, tokenizer, *, text_field: str, chat_template: bool
                    ) -> Tokenized | BadRecord:
    """Plain text, or chat ``messages`` rendered with the tokenizer's template.

    For chat records the loss mask selects rows whose next token belongs to an
    assistant reply (its content and end-of-turn), so training can be assistant-only.
    """
    if text_field in rec:
        text = rec[text_field]
        if not isinstance(text, str):
            return BadRecord(f"field {text_field} is not a string")
        if not text.strip():
            return BadRecord("empty text")
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        return Tokenized(np.asarray(ids, dtype=np.int32), None)
    if "messages" in rec:
        if not chat_template:
            return BadRecord("chat record with --no-chat-template")
        return _tokenize_chat(rec["messages"], tokenizer)
    return BadRecord(f"missing field {text_field}")


def _tokenize_chat(messages: Any, tokenizer) -> Tokenized | BadRecord:
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("content"), str) and "role" in m
            for m in messages):
        return BadRecord("malformed messages")
    if tokenizer.chat_template is None:
        raise ConfigError("chat records need a tokenizer with a chat template "
                          "(or pass --no-chat-template to skip them)")
    render = lambda msgs: tokenizer.apply_chat_template(msgs, tokenize=False)  # noqa: E731
    text = render(messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start, end = len(render(messages[:i])) if i else 0, len(render(messages[: i + 1]))
        if text[:end] != render(messages[: i + 1]):
            return BadRecord("chat template is not prefix-stable")
        content_at = text.find(m["content"], start, end)
        spans.append((content_at if content_at >= 0 else start, end))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], dtype=np.int32)
    if not ids.size:
        return BadRecord("empty text")
    starts = np.asarray([o[0] for o in enc["offset_mapping"]])
    is_assistant = np.zeros(ids.size, dtype=bool)
    for s, e in spans:
        is_assistant |= (starts >= s) & (starts < e)
    loss_mask = np.zeros(ids.size, dtype=bool)
    loss_mask[:-1] = is_assistant[1:]
    return Tokenized(ids, loss_mask)
