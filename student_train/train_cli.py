"""Training commands: ``train``, ``eval``, ``plot`` and ``demo-summary``."""

from __future__ import annotations

import json
import shlex
import signal
import sys
from pathlib import Path

import click


TRAIN_EXAMPLES = """\b
Examples:
  kdpipe train --config student_train/configs/demo.yaml \\
      --set data.path=runs/capture --set eval.data=runs/heldout --set out=runs/train
  kdpipe train --config student_train/configs/demo.yaml --set out=runs/train --resume
  torchrun --nproc-per-node 8 -m kdpipe.cli train --config student_train/configs/stage1.yaml
"""


@click.command(epilog=TRAIN_EXAMPLES)
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
              help="YAML config (student_train/configs/reference.yaml documents every key; "
                   "without it the defaults apply).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config key, e.g. --set train.max_steps=100 --set "
                   "loss.terms.0.weight=0.5 (values are YAML). Repeatable.")
@click.option("--resume", is_flag=True,
              help="Continue from the latest checkpoint in the run's out directory.")
@click.option("--overwrite", is_flag=True,
              help="Start over: delete the previous run in the out directory, after the config "
                   "and data are checked. Only a kdpipe run directory holding nothing else is "
                   "deleted; never one holding an input, nor the working directory.")
@click.option("--print-config", is_flag=True, help="Print the resolved config and exit.")
def train(config_path: Path | None, overrides: tuple[str, ...], resume: bool, overwrite: bool,
          print_config: bool) -> None:
    """Distill a teacher's captured dataset into a KDA hybrid student.

    Runs on one process, or under torchrun on several GPUs or nodes (DDP, or FSDP2 when a
    replica does not fit one GPU or with --set parallel.strategy=fsdp). Writes checkpoints,
    metrics.jsonl, TensorBoard logs and the final student (OUT/final) to the config's out
    directory. Ctrl-C or SIGTERM checkpoints, prints the command that resumes and exits
    with 130 or 143; a second one stops at once, losing the steps since the last checkpoint.
    """
    from .train_config import dump_config, load_config

    cfg = load_config(config_path, list(overrides))
    if print_config:
        click.echo(dump_config(cfg), nl=False)
        return
    if resume and overwrite:
        from kdpipe.schemas import ConfigError
        raise ConfigError("--resume and --overwrite contradict each other")
    from transformers.utils import logging as hf_logging

    from kdpipe.runtime import Interrupted

    from .train_dist import shutdown_distributed
    from .trainer import Trainer
    hf_logging.disable_progress_bar()
    try:
        trainer = Trainer(cfg, resume=resume, overwrite=overwrite,
                          prepare_embedded=_from_kdpipe_cli("prepare_embedded_teacher"))
        try:
            result = trainer.train()
        except Interrupted as e:
            if trainer.dist.is_main:
                click.echo(f"stopped at once by {e} during step {trainer.step + 1}; the steps "
                           f"since the last checkpoint are lost. Continue with:\n  "
                           + resume_command(config_path, overrides, trainer.dist.distributed))
            raise SystemExit(128 + e.signum) from None
        if result.get("stopped"):
            if trainer.dist.is_main:
                click.echo(f"stopped by {result['stopped']} after step {result['step']}; "
                           f"checkpoint saved. Continue with:\n  "
                           + resume_command(config_path, overrides, trainer.dist.distributed))
            raise SystemExit(128 + signal.Signals[result["stopped"]])
        if trainer.dist.is_main:
            ev = result["eval"]
            tail = f"; held-out kl {ev['kl']:.4f}, top1 {ev['top1']:.3f}" if ev else ""
            if ev and "kl_full" in ev:
                tail += f", kl_full {ev['kl_full']:.4f}"
            click.echo(f"trained {result['step']} steps, final loss "
                       f"{result['train'].get('loss', float('nan')):.4f}{tail}; "
                       f"student in {Path(cfg.out) / 'final'}")
        if trainer.dist.is_main and result["skipped_shards"]:
            click.echo(f"skipped {len(result['skipped_shards'])} corrupt shard(s): "
                       f"{', '.join(result['skipped_shards'])}")
    finally:
        shutdown_distributed()


def _from_kdpipe_cli(name: str):
    """A function the ``kdpipe`` command hands to its stages (it alone knows every stage), or
    None when this command runs on its own."""
    ctx = click.get_current_context(silent=True)
    return ((ctx.find_root().obj if ctx else None) or {}).get(name)


def resume_command(config_path: Path | None, overrides: tuple[str, ...],
                   distributed: bool) -> str:
    """The command line that continues a stopped run: the same config and overrides, with
    ``--resume`` (under torchrun: the same launch with these arguments)."""
    args = ["kdpipe", "train"] + (["--config", str(config_path)] if config_path else [])
    for item in overrides:
        args += ["--set", item]
    line = shlex.join(args + ["--resume"])
    return f"{line}   (as arguments of the same torchrun launch)" if distributed else line


@click.command("eval", epilog="""\b
Example:
  kdpipe eval --student runs/train/final --data runs/heldout --json eval.json
""")
@click.option("--student", "student_dir", required=True,
              type=click.Path(exists=True, file_okay=False),
              help="Student checkpoint (kdpipe student init output, OUT/final, or a "
                   "checkpoint's model/ directory).")
@click.option("--data", required=True, help="Captured held-out dataset (directory or URL).")
@click.option("--seq-len", default=2048, show_default=True, type=click.IntRange(1))
@click.option("--max-tokens", default=0, show_default=True, type=click.IntRange(0),
              help="Evaluate on about this many tokens (0: all).")
@click.option("--device", default="auto", show_default=True)
@click.option("--precision", default="auto", show_default=True,
              type=click.Choice(["auto", "bf16", "fp32"]))
@click.option("--no-tokenizer-check", is_flag=True,
              help="Do not compare the student's tokenizer with the dataset's.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the metrics to this JSON file.")
@click.option("--progress/--no-progress", default=None,
              help="Show a progress bar on stderr (default: when stderr is a terminal).")
def eval_cmd(student_dir: str, data: str, seq_len: int, max_tokens: int, device: str,
             precision: str, no_tokenizer_check: bool, json_out: Path | None,
             progress: bool | None) -> None:
    """Held-out metrics of a student against the teacher's captured distributions:
    sparse KL (top-k plus tail bucket, and top-k renormalized), top-1 agreement, and
    next-token cross-entropy; on a dense dataset also the full-vocabulary KL and top-1."""
    from transformers.utils import logging as hf_logging

    from .evaluate import evaluate_student
    hf_logging.disable_progress_bar()
    m = evaluate_student(student_dir, data, seq_len=seq_len, max_tokens=max_tokens,
                         device=device, precision=precision,
                         check_tokenizer=not no_tokenizer_check,
                         progress=sys.stderr.isatty() if progress is None else progress)
    click.echo(f"{student_dir} on {data}: {m['rows']} rows, {m['tokens']} tokens")
    click.echo(f"  kl       {m['kl']:.5f}  (teacher || student, top-k + tail bucket)")
    click.echo(f"  kl_topk  {m['kl_topk']:.5f}  (teacher renormalized on its top-k)")
    click.echo(f"  top1     {m['top1']:.4f}")
    click.echo(f"  ce       {m['ce']:.4f}")
    if "kl_full" in m:
        click.echo(f"  kl_full  {m['kl_full']:.5f}  (teacher || student, whole vocabulary)")
        click.echo(f"  top1_full {m['top1_full']:.4f}  (the teacher's full argmax)")
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(m, indent=1))


@click.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--out", "out_png", type=click.Path(dir_okay=False),
              help="PNG to write (default: RUN_DIR/curves.png).")
def plot(run_dir: str, out_png: str | None) -> None:
    """Draw a training run's loss and held-out curves to a PNG."""
    from .metrics import plot_run
    click.echo(str(plot_run(run_dir, out_png)))


@click.command("demo-summary")
@click.option("--capture", "capture_dir", default="runs/capture", show_default=True)
@click.option("--run", "run_dir", default="runs/train", show_default=True)
@click.option("--out", "out_json", default="runs/demo/summary.json", show_default=True,
              type=click.Path(dir_okay=False, path_type=Path))
def demo_summary(capture_dir: str, run_dir: str, out_json: Path) -> None:
    """Summarize a capture + training run: tokens captured, bytes/token, and the held-out
    KL of the converted student before training and after."""
    from .demo import summarize, write_summary
    summary = summarize(capture_dir, run_dir)
    write_summary(summary, out_json)
    click.echo(f"tokens captured        {summary['tokens_captured']:,}")
    click.echo(f"bytes/token            {summary['bytes_per_token']:.1f}  "
               f"(codec {summary['codec']})")
    click.echo(f"held-out KL before     {summary['kl_before']:.4f}  (converted student)")
    click.echo(f"held-out KL after      {summary['kl_after']:.4f}  "
               f"({summary['steps']} steps, {summary['tokens_trained']:,} tokens)")
    click.echo(f"wrote {out_json}")
