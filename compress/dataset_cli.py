"""Dataset commands: ``inspect``, ``verify``, ``dump`` and ``show``."""

from __future__ import annotations

import json
import sys

import click
import numpy as np


@click.command("inspect")
@click.argument("dataset")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def inspect_cmd(dataset: str, as_json: bool) -> None:
    """Summarize DATASET: teacher, capture settings, codec, documents, tokens, bytes/token."""
    from .verify import dataset_stats
    s = dataset_stats(dataset)
    if as_json:
        click.echo(json.dumps(s, indent=1, default=str))
        return
    t, c = s["teacher"], s["capture"]
    split = ", ".join(f"{k} {v:.1f}" for k, v in s["bytes_per_token_split"].items())
    skipped = ", ".join(f"{k}: {v}" for k, v in s["records"]["skipped"].items()) or "none"
    click.echo("\n".join([
        f"dataset     {s['uri']} ({'complete' if s['complete'] else 'INCOMPLETE'}, format "
        f"{s['format_version']}, kdpipe {s['producer'].get('version')})",
        f"teacher     {t['name_or_path']} ({t['architecture']}, vocab {t['vocab_size']}, "
        f"hidden {t['hidden_size']} x {t['num_hidden_layers']} layers, {t['dtype']})",
        f"capture     backend {c['backend']}, top-k {c['top_k']}, max length {c['max_seq_len']}"
        f", hidden layers {c['hidden_layers'] or 'none'}, chat template {c['chat_template']}",
        f"codec       {s['codec']['name']}: {json.dumps({k: v for k, v in s['codec'].items() if k != 'name'})}",
        f"content     {s['documents']} documents, {s['tokens']} tokens, {s['teacher_rows']} "
        f"teacher rows in {s['shards']} shards",
        f"size        {s['bytes'] / 1e6:.2f} MB, {s['bytes_per_token']:.1f} bytes/token "
        f"({split})",
        f"records     read {s['records']['read']}, written {s['records']['written']}, "
        f"truncated {s['records']['truncated']}, split {s['records']['split']}, "
        f"skipped: {skipped}",
    ]))


@click.command("verify")
@click.argument("dataset")
@click.option("--deep", is_flag=True, help="Also decode every row and check its invariants.")
@click.option("--no-progress", is_flag=True,
              help="No progress bar (there is none either when stderr is not a terminal).")
def verify_cmd(dataset: str, deep: bool, no_progress: bool) -> None:
    """Check every shard, manifest, fragment and artifact of DATASET (checksum, size, schema,
    codec); exit 1 if any is bad."""
    from .verify import verify_dataset
    report = verify_dataset(dataset, deep=deep, progress=not no_progress)
    for p in report.problems:
        click.echo(f"BAD  {p.file}: {p.message}", err=True)
    click.echo(f"{report.shards_checked} shards, {report.documents_checked} documents checked"
               f"{' (deep)' if deep else ''}: "
               f"{'OK' if report.ok else f'{len(report.problems)} bad file(s)'}")
    sys.exit(0 if report.ok else 1)


@click.command("dump")
@click.argument("dataset")
@click.option("--out", required=True, help="Output .npz file.")
@click.option("--limit", type=click.IntRange(1), default=None, help="First N documents only.")
def dump_cmd(dataset: str, out: str, limit: int | None) -> None:
    """Write decoded arrays of DATASET to an .npz (per document: DOCID/input_ids,
    DOCID/teacher_mask, DOCID/topk_ids, DOCID/topk_logprobs, DOCID/hidden/LAYER; a sampled
    dataset has DOCID/sample_ids and DOCID/sample_counts instead of the top-k; a dense dataset
    also DOCID/logprobs [T, V], the rebuilt full log-probabilities)."""
    from .outputs import check_output_file
    from .verify import dump_arrays
    path = check_output_file(out if out.endswith(".npz") else f"{out}.npz", "--out")
    arrays = dump_arrays(dataset, limit)
    np.savez(path, **arrays)
    click.echo(f"wrote {len(arrays)} arrays to {path}")


@click.command("show")
@click.argument("dataset")
@click.option("--doc", "doc_index", default=0, show_default=True, type=click.IntRange(0),
              help="Document index, in dataset order.")
@click.option("--rows", default=16, show_default=True, type=click.IntRange(1),
              help="Positions to show.")
@click.option("--start", default=0, show_default=True, type=click.IntRange(0),
              help="First position shown.")
@click.option("--top", default=5, show_default=True, type=click.IntRange(1),
              help="Teacher tokens shown per position.")
@click.option("--tokenizer", default=None,
              help="Tokenizer directory or hub id, if not the one at the manifest's teacher "
                   "path (it must be the tokenizer the dataset was captured with).")
def show_cmd(dataset: str, doc_index: int, rows: int, start: int, top: int,
             tokenizer: str | None) -> None:
    """Print a document of DATASET: its tokens, decoded, and at each position the teacher's
    top tokens for the next one with their probabilities."""
    from .reader import Dataset
    from .show import format_document
    lines = format_document(Dataset(dataset, allow_incomplete=True), doc_index, start=start,
                            rows=rows, top=top, tokenizer=tokenizer)
    click.echo("\n".join(lines))
