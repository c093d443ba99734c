"""The ``kdpipe`` command: the one place that wires the stages together.

Subcommands live with the stage that owns them and are imported only when used, so
``kdpipe --help`` is instant and a training node never imports capture code.
"""

from __future__ import annotations

import importlib
import sys

import click

from schemas import KdpipeError

# command name -> "module:attribute" of a click command or group
COMMANDS: dict[str, str] = {
    "teacher": "capture.cli:teacher",
    "corpus": "capture.cli:corpus",
    "capture": "capture.cli:capture",
    "inspect": "compress.dataset_cli:inspect_cmd",
    "verify": "compress.dataset_cli:verify_cmd",
    "dump": "compress.dataset_cli:dump_cmd",
    "student": "student_train.cli:student",
    "compress": "compress.cli:compress_cmd",
    "fidelity": "compress.cli:fidelity_cmd",
    "import": "compress.cli:import_",
    "export": "compress.cli:export",
    "train": "student_train.train_cli:train",
    "eval": "student_train.train_cli:eval_cmd",
    "plot": "student_train.train_cli:plot",
    "demo-summary": "student_train.train_cli:demo_summary",
}

_HELP = {
    "teacher": "Prepare the embedded teacher.",
    "corpus": "Build the embedded text corpus.",
    "capture": "Run a teacher over a dataset and write top-k log-probs and hidden states.",
    "inspect": "Summarize a dataset: teacher, settings, codec, sizes.",
    "verify": "Check a dataset's checksums and schema (--deep: decode every row).",
    "dump": "Write decoded arrays of a dataset to an .npz file.",
    "student": "Build a KDA hybrid student from a teacher (student init).",
    "compress": "Re-encode a dataset with another codec.",
    "fidelity": "Compare codecs on an exact dataset: bytes/token, KL, speed.",
    "import": "Read another tool's dataset (DistillKit) into a kdpipe dataset.",
    "export": "Write a dataset in DistillKit's or axolotl's format.",
    "train": "Distill a captured dataset into a KDA hybrid student (YAML config, torchrun).",
    "eval": "Held-out KL, top-1 agreement and cross-entropy of a student checkpoint.",
    "plot": "Draw a training run's curves to a PNG.",
    "demo-summary": "Summarize a capture and a training run (make demo).",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attr = COMMANDS[name].split(":")
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, _HELP.get(name, "")) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="kdpipe")
def cli() -> None:
    """Offline knowledge distillation: capture -> compressed Parquet shards -> student training."""


def main() -> None:
    try:
        cli(standalone_mode=False)
    except KdpipeError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)


if __name__ == "__main__":  # `python -m kdpipe.cli`, e.g. under `torchrun -m kdpipe.cli train`
    main()
