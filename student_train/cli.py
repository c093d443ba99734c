"""Student commands: ``student init`` builds a KDA hybrid student from a teacher checkpoint."""

from __future__ import annotations

from pathlib import Path

import click


@click.group(epilog="""\b
Example:
  kdpipe student init --teacher TEACHER_DIR --pattern 3:1 --out runs/student
""")
def student() -> None:
    """The KDA hybrid student."""


@student.command("init", epilog="""\b
Examples:
  kdpipe student init --teacher "$(kdpipe teacher prepare --quiet)" --out runs/student
  kdpipe student init --teacher TEACHER_DIR --pattern KKKF --out runs/student --overwrite
  kdpipe student init --teacher TEACHER_DIR --dry-run
""")
@click.option("--teacher", "teacher_dir", required=True,
              type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Teacher checkpoint directory (LlamaForCausalLM or ArceeForCausalLM, "
                   "safetensors).")
@click.option("--pattern", default="3:1", show_default=True,
              help="Layer types: '3:1' (every 4th layer and the last full attention without RoPE, "
                   "the rest KDA), 'kda', 'teacher' (all full attention with RoPE), one letter per "
                   "layer (K=kda, F=full_nope, R=full_rope, e.g. KKKF...), or a comma-separated "
                   "list of kda/full_nope/full_rope.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Directory for the student checkpoint and tokenizer "
                   "(required unless --dry-run).")
@click.option("--seed", default=0, show_default=True, help="Seed for the KDA-only parameters.")
@click.option("--overwrite", is_flag=True,
              help="Replace a student that kdpipe student init wrote to --out (a directory "
                   "holding other files is refused).")
@click.option("--dry-run", is_flag=True,
              help="Only print the parameter table, from the teacher's config.json "
                   "(no weights read).")
def init(teacher_dir: Path, pattern: str, out_dir: Path | None, seed: int, overwrite: bool,
         dry_run: bool) -> None:
    """Initialize a student from a teacher: copy embeddings, LM head, norms, MLPs and attention
    weights; start KDA-only parameters fresh. Prints parameter counts (total, copied, fresh)."""
    from transformers.utils import logging as hf_logging

    from kdpipe.schemas import ConfigError

    from .model.convert import convert_teacher, plan_student

    if dry_run:
        _, report = plan_student(teacher_dir, pattern)
        click.echo(report.table())
        return
    if out_dir is None:
        raise ConfigError("--out is required (or pass --dry-run)")
    hf_logging.disable_progress_bar()
    report = convert_teacher(teacher_dir, pattern, out_dir, seed=seed, overwrite=overwrite)
    click.echo(report.table())
    if report.tokenizer_written:
        click.echo(f"wrote {out_dir} with the teacher's tokenizer")
    else:
        click.echo(f"wrote {out_dir} (the teacher directory has no tokenizer)")
