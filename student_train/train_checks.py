"""Checks run before step 1: does this dataset fit this student and this loss?

Every mismatch is collected and reported in one ``ConfigError`` naming both sides: the
dataset's value (with the manifest it comes from) and the student's (with its directory).
"""

from __future__ import annotations

from pathlib import Path

from kdpipe.compress import Dataset, sampling_of
from kdpipe.compress.dense import TeacherHead, dense_layer, load_head
from kdpipe.schemas import ConfigError, Manifest, tokenizer_fingerprint

from .train_config import SAMPLED_LOSSES, SPARSE_LOSSES, DataConfig, LossConfig


def resolve_layer_map(layer_map, *, student_layers: int,
                      captured: list[int]) -> list[tuple[int, int]]:
    """``all`` -> every captured decoder layer i in 1..student_layers mapped to student layer i
    (layer 0, the embeddings, is copied from the teacher and skipped); else the given pairs."""
    if layer_map == "all":
        return [(i, i) for i in captured if 1 <= i <= student_layers]
    pairs = []
    for item in layer_map:
        if not (isinstance(item, (list, tuple)) and len(item) == 2
                and all(isinstance(x, int) for x in item)):
            raise ConfigError(f"loss.layer_map entries must be [student_layer, teacher_layer] "
                              f"pairs of integers, got {item!r}")
        pairs.append((int(item[0]), int(item[1])))
    return pairs


def check_dataset(manifest: Manifest, *, where: str, student_config, student_dir: str | None,
                  data: DataConfig, loss: LossConfig, layer_map: list[tuple[int, int]],
                  tokenizer_dir: str | None = None) -> None:
    """Refuse a dataset whose teacher, codec or captured layers do not fit the student.
    ``student_dir`` None: the student is still to be built from the teacher, whose tokenizer
    (in ``tokenizer_dir``) it will get; by default the tokenizer is the student's."""
    problems = []
    tokenizer_dir = tokenizer_dir or student_dir
    t = manifest.teacher
    student = f"student {student_dir or '(built from the teacher)'}"
    if t.vocab_size != student_config.vocab_size:
        problems.append(f"vocabulary: dataset {where} has teacher vocab_size {t.vocab_size}, "
                        f"{student} has vocab_size {student_config.vocab_size}")
    if data.check_tokenizer:
        fp = tokenizer_fingerprint_of(tokenizer_dir)
        if fp is None:
            problems.append(f"tokenizer: {student} has no tokenizer to compare with the dataset's "
                            f"({t.tokenizer_sha256[:12]}...); set data.check_tokenizer=false to "
                            f"skip the check")
        elif fp != t.tokenizer_sha256:
            problems.append(f"tokenizer: dataset {where} was captured with tokenizer "
                            f"{t.tokenizer_sha256[:12]}..., {student} has {fp[:12]}...")
    if data.codec is not None:
        from kdpipe.compress import load_codec_config
        want = load_codec_config(data.codec)
        if want.fingerprint() != manifest.codec.fingerprint():
            problems.append(f"codec: dataset {where} is encoded with {manifest.codec.name!r} "
                            f"({manifest.codec.to_json()}), the config requires {want.name!r} "
                            f"({want.to_json()})")
    problems += _signal_problems(manifest, where, loss)
    if loss.uses_hidden:
        captured = list(manifest.capture.hidden_layers)
        if not layer_map:
            problems.append(f"hidden layers: the loss has hidden-state terms but dataset {where} "
                            f"captured layers {captured}, none of which maps onto the "
                            f"{student_config.num_hidden_layers} student layers")
        for s, tl in layer_map:
            if tl not in captured:
                problems.append(f"hidden layers: loss.layer_map uses teacher layer {tl}, dataset "
                                f"{where} captured only {captured}")
            if not 0 <= s <= student_config.num_hidden_layers:
                problems.append(f"hidden layers: loss.layer_map uses student layer {s}, {student} "
                                f"has layers 0..{student_config.num_hidden_layers}")
        if t.hidden_size != student_config.hidden_size and loss.projection == "none":
            problems.append(f"hidden size: dataset {where} has teacher hidden_size "
                            f"{t.hidden_size}, {student} has {student_config.hidden_size}; "
                            f"use loss.projection=auto for a learned projection")
    if problems:
        raise ConfigError("the dataset does not fit the student:\n  " + "\n  ".join(problems))


def _signal_problems(manifest: Manifest, where: str, loss: LossConfig) -> list[str]:
    """The loss terms must read the teacher signal the dataset holds, at its temperature."""
    sampling = sampling_of(manifest.codec)
    problems = []
    for i, t in enumerate(loss.terms):
        term = f"loss.terms[{i}] ({t.kind})"
        if sampling is None and t.kind in SAMPLED_LOSSES:
            problems.append(f"signal: {term} trains on sampled teacher rows, dataset {where} "
                            f"holds top-k rows (codec {manifest.codec.name!r}); use kl (or "
                            f"capture with --codec sampled)")
        elif sampling is not None and t.kind in SPARSE_LOSSES:
            problems.append(f"signal: {term} needs top-k rows, dataset {where} holds the "
                            f"sampled signal ({sampling[0]} draws per position, codec "
                            f"{manifest.codec.name!r}); use kind: sampled")
        elif sampling is not None and t.kind in SAMPLED_LOSSES and \
                t.temperature != sampling[1]:
            problems.append(f"temperature: {term} has temperature {t.temperature:g}, dataset "
                            f"{where} was sampled at temperature {sampling[1]:g}")
    return problems


def load_dense_head(dataset: Dataset, *, student_vocab: int, student: str
                    ) -> tuple[TeacherHead, int]:
    """A dense dataset's teacher head and the layer it rebuilds from, refused with one line
    when the dataset is not dense, has lost its head, or the student's vocabulary differs
    from the head's (the full distributions would not line up)."""
    head = load_head(dataset)
    if head.vocab_size != student_vocab:
        raise ConfigError(f"{dataset.uri}: its teacher head has a vocabulary of "
                          f"{head.vocab_size} tokens, {student} has vocab_size {student_vocab}; "
                          f"dense losses compare full distributions over the same vocabulary")
    return head, dense_layer(dataset.manifest)


def check_same_teacher(train: Manifest, other: Manifest, *, train_where: str,
                       other_where: str) -> None:
    """The held-out dataset must come from the same teacher as the training data."""
    problems = []
    for field in ("vocab_size", "tokenizer_sha256", "config_sha256"):
        a, b = getattr(train.teacher, field), getattr(other.teacher, field)
        if a != b:
            problems.append(f"teacher {field}: training data {train_where} has {a}, "
                            f"held-out data {other_where} has {b}")
    if problems:
        raise ConfigError("held-out data comes from another teacher:\n  " + "\n  ".join(problems))
    if sampling_of(other.codec) is not None:
        raise ConfigError(f"held-out data {other_where} holds the sampled teacher signal; "
                          f"evaluation measures KL on top-k rows: capture the held-out set "
                          f"with a top-k codec (e.g. --codec exact)")


def tokenizer_fingerprint_of(model_dir: str | None) -> str | None:
    """``schemas.tokenizer_fingerprint`` of the tokenizer saved in ``model_dir``, if any."""
    if model_dir is None or not any((Path(model_dir) / f).exists() for f in
                                    ("tokenizer.json", "tokenizer_config.json",
                                     "tokenizer.model")):
        return None
    from transformers import AutoTokenizer

    return tokenizer_fingerprint(AutoTokenizer.from_pretrained(model_dir))
