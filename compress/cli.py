"""Commands of the codec library: compress, fidelity, import, export."""

from __future__ import annotations

import json
from pathlib import Path

import click

from kdpipe.schemas import CodecConfig, ConfigError

from .codec import check_recode, load_codec_config, needs_fitting, preset_names, signal_of


@click.command("compress")
@click.argument("src")
@click.argument("dst")
@click.option("--codec", required=True, help="Codec preset name or YAML/JSON file.")
@click.option("--calibration-tokens", default=8192, show_default=True, type=click.IntRange(1),
              help="Low-rank hidden codec: fit its projection on the hidden states of SRC's "
                   "first documents, about this many tokens per layer.")
@click.option("--overwrite", is_flag=True,
              help="Replace a kdpipe dataset already in DST (only its files are removed).")
def compress_cmd(src: str, dst: str, codec: str, calibration_tokens: int,
                 overwrite: bool) -> None:
    """Re-encode dataset SRC (any codec) into DST with another codec.

    The sampled signal re-encodes only into codecs that sample the same way (draws,
    temperature, seed), and a top-k never into a sampled codec: sampling from a stored
    top-k is not sampling from the teacher.

    A low-rank hidden codec gets its projection fitted on SRC's first documents; the
    projection is stored in DST as an artifact. A dense codec needs a dense SRC, whose
    teacher head DST ships too. Rerunning the same command after an
    interruption resumes where it stopped (with the projection fitted the first time).
    DST must be new, empty or a kdpipe dataset; SRC is only read.
    """
    from .outputs import prepare_dataset_output
    from .reader import Dataset
    from .writer import PartWriter

    config = load_codec_config(codec)
    source = Dataset(src)
    check_recode(source.manifest.codec, config, src)
    prepare_dataset_output(dst, sources=[src], overwrite=overwrite)
    m = source.manifest
    artifacts = None
    if needs_fitting(config):
        config, artifacts = _resolve_lowrank(source, config, dst, calibration_tokens)
    if config.dense:   # the full distribution needs SRC's last layer and teacher head
        from .dense import HEAD_ARTIFACT, load_head
        load_head(source)
        artifacts = {**(artifacts or {}), HEAD_ARTIFACT: source.storage.read_bytes(HEAD_ARTIFACT)}
    # offline: no GPU to keep up with, so the hidden states get zstd too (smaller shards)
    with PartWriter(dst, teacher=m.teacher, capture=m.capture, codec=config, index=0, count=1,
                    artifacts=artifacts, zstd_hidden=True) as writer:
        for i, doc in enumerate(source.iter_documents()):
            if i >= writer.next_record:
                writer.add_record(i, [doc])
                writer.end_window()
        manifest = writer.finish()
    if manifest is not None:
        click.echo(f"{dst}: {manifest.documents} documents, {manifest.tokens} tokens, "
                   f"{manifest.total_bytes / 1e6:.1f} MB (source {m.total_bytes / 1e6:.1f} MB), "
                   f"codec {config.name}")


_PROJECTION_KEYS = ("projection", "projection_sha256")


def _without_projection(config: CodecConfig) -> dict:
    d = config.to_dict()
    d.pop("name")
    d["hidden"] = {k: v for k, v in d["hidden"].items() if k not in _PROJECTION_KEYS}
    return d


def _resolve_lowrank(source, config: CodecConfig, dst: str, calibration_tokens: int
                     ) -> tuple[CodecConfig, dict[str, bytes] | None]:
    """The low-rank codec completed with a projection: the one DST already holds when this
    run resumes an earlier one with the same codec, else one fitted on SRC's first
    documents (returned with its artifact)."""
    from .storage import Storage

    from .fidelity import resolve_lowrank
    from .manifests import load_manifest_or_fragments

    existing = load_manifest_or_fragments(Storage(dst), allow_incomplete=True, missing_ok=True)
    if existing is not None and \
            _without_projection(existing.codec) == _without_projection(config):
        click.echo(f"{dst}: resuming with its projection "
                   f"{existing.codec.hidden.params.get('projection')}")
        return existing.codec, None
    layers = source.hidden_layers
    if not layers:
        raise ConfigError(f"codec {config.name!r}: the lowrank hidden codec needs hidden "
                          f"states, but {source.uri} captured no hidden layers")
    states: dict[int, list] = {layer: [] for layer in layers}
    tokens = 0
    for doc in source.iter_documents():
        if doc.num_tokens == 0:
            continue
        for layer in layers:
            states[layer].append(doc.hidden[layer].float())
        tokens += doc.num_tokens
        if tokens >= calibration_tokens:
            break
    if tokens == 0:
        raise ConfigError(f"{source.uri} has no tokens to fit a low-rank projection on")
    import torch

    calibration = {layer: torch.cat(xs) for layer, xs in states.items()}
    resolved, artifacts = resolve_lowrank(config, calibration)
    click.echo(f"fitted a rank-{resolved.hidden.params.get('rank')} projection for layers "
               f"{layers} on {tokens} tokens of {source.uri}")
    return resolved, artifacts


@click.command("fidelity")
@click.argument("dataset")
@click.option("--codecs", default=None,
              help="Comma-separated preset names or codec files (default: every preset).")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="Write a PNG of bytes/token against KL.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Write the rows as a JSON list of objects.")
@click.option("--max-rows", type=click.IntRange(1), default=None,
              help="Evaluate on the first documents holding this many teacher rows.")
@click.option("--sampled", "sampled_paths", multiple=True,
              help="A sampled capture of the same records (repeatable): adds its row, scored "
                   "against DATASET.")
@click.option("--device", default="cpu", show_default=True, help="Decode device (cpu, cuda).")
@click.option("--repeats", default=1, show_default=True, type=click.IntRange(1),
              help="Time encode/decode this many times, keep the best.")
@click.option("--threads", default=1, show_default=True, type=click.IntRange(1),
              help="torch CPU threads while timing (one: comparable across machines and "
                   "not slowed down by other processes).")
def fidelity_cmd(dataset: str, codecs: str | None, plot_path: str | None,
                 json_path: str | None, max_rows: int | None, sampled_paths: tuple[str, ...],
                 device: str, repeats: int, threads: int) -> None:
    """Compare codecs on an exact dataset: size, divergence, speed. Dense codecs are compared
    on a dense exact dataset (--codec dense-exact at capture), by the full distribution.

    Sampled codecs draw from the teacher's full distribution, which an exact top-k does not
    hold: pass a sampled capture of the same records with --sampled instead."""
    import torch

    from . import fidelity
    from .outputs import check_output_file
    from .reader import Dataset

    for option, path in (("--plot", plot_path), ("--json", json_path)):
        if path:
            check_output_file(path, option)
    torch.set_num_threads(threads)
    names = codecs.split(",") if codecs else preset_names()
    configs = [load_codec_config(n.strip()) for n in names if n.strip()]
    sampled = [c.name for c in configs if signal_of(c) != "topk"]
    if sampled and codecs:
        raise ConfigError(f"--codecs {','.join(sampled)}: a sampled codec draws from the "
                          f"teacher's full distribution, which {dataset} does not hold; pass "
                          f"a sampled capture of the same records with --sampled DIR")
    configs = [c for c in configs if signal_of(c) == "topk"]
    exact = Dataset(dataset)
    sample = fidelity.load_sample(exact, max_rows=max_rows)
    if not codecs and sample.head is None:   # dense presets need a dense exact reference
        configs = [c for c in configs if not c.dense]
    rows = [fidelity.evaluate(sample, c, device=device, repeats=repeats) for c in configs]
    rows += [fidelity.evaluate_sampled(exact, Dataset(p), max_rows=max_rows, device=device)
             for p in sampled_paths]
    click.echo(f"{dataset}: {sum(sample.rows)} positions, {len(sample.rows)} documents, "
               f"captured k={sample.k}, decode on {device}, {threads} CPU thread(s)")
    click.echo(fidelity.format_table(rows))
    if sampled_paths:
        click.echo(fidelity.format_sampled(rows))
    if json_path:
        Path(json_path).write_text(json.dumps([r.to_dict() for r in rows], indent=1))
    if plot_path:
        fidelity.plot(rows, plot_path)


@click.command("import")
@click.option("--format", "fmt", required=True, type=click.Choice(["distillkit"]),
              help="Format of SRC.")
@click.option("--codec", default="exact", show_default=True,
              help="Codec of the kdpipe dataset written (preset or file).")
@click.option("--vocab-size", type=click.IntRange(1), default=None,
              help="The teacher's vocabulary (default: DistillKit's d).")
@click.option("--overwrite", is_flag=True,
              help="Replace a kdpipe dataset already in DST (only its files are removed).")
@click.argument("src")
@click.argument("dst")
def import_(fmt: str, codec: str, vocab_size: int | None, overwrite: bool, src: str,
            dst: str) -> None:
    """Read dataset SRC of another tool into DST, a new kdpipe dataset.

    DistillKit rows are decoded exactly as DistillKit decodes them. DST must be new, empty
    or a kdpipe dataset (an interrupted import resumes); SRC is only read.
    """
    from .interop import distillkit

    n = distillkit.import_dataset(src, dst, codec=load_codec_config(codec), vocab_size=vocab_size,
                                  overwrite=overwrite)
    click.echo(f"{dst}: imported {n} documents from {src}")


@click.command("export")
@click.option("--format", "fmt", required=True, type=click.Choice(["distillkit", "axolotl"]),
              help="Format to write.")
@click.option("--codec", default="distillkit-recommended", show_default=True,
              help="distillkit only: a codec in DistillKit's layout (preset or file).")
@click.option("--overwrite", is_flag=True,
              help="Replace an earlier export in OUT (only its files are removed).")
@click.argument("dataset")
@click.argument("out")
def export(fmt: str, codec: str, overwrite: bool, dataset: str, out: str) -> None:
    """Write kdpipe dataset DATASET into OUT in another tool's format.

    OUT must be new, empty or (with --overwrite) an earlier export; DATASET is only read.
    """
    from .interop import axolotl, distillkit
    from .reader import Dataset

    source = Dataset(dataset)
    if fmt == "distillkit":
        n = distillkit.export_dataset(source, out, codec=load_codec_config(codec),
                                      overwrite=overwrite)
    else:
        n = axolotl.export_dataset(source, out, overwrite=overwrite)
    click.echo(f"{out}: {n} documents in {fmt} format")
