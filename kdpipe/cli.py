"""The ``kdpipe`` command: the one place that wires the stages together.

Subcommands live with the stage that owns them and are imported only when used, so
``kdpipe --help`` is instant and a training node never imports capture code. Their
example invocations are kept here, in one table, so every ``--help`` ends with one.
"""

from __future__ import annotations

import importlib
import sys

import click

from kdpipe.schemas import KdpipeError

# command name -> "module:attribute" of a click command or group
COMMANDS: dict[str, str] = {
    "doctor": "kdpipe.doctor:doctor_cmd",
    "teacher": "kdpipe.capture.cli:teacher",
    "corpus": "kdpipe.capture.cli:corpus",
    "capture": "kdpipe.capture.cli:capture",
    "inspect": "kdpipe.compress.dataset_cli:inspect_cmd",
    "verify": "kdpipe.compress.dataset_cli:verify_cmd",
    "dump": "kdpipe.compress.dataset_cli:dump_cmd",
    "show": "kdpipe.compress.dataset_cli:show_cmd",
    "student": "kdpipe.student_train.cli:student",
    "compress": "kdpipe.compress.cli:compress_cmd",
    "fidelity": "kdpipe.compress.cli:fidelity_cmd",
    "import": "kdpipe.compress.cli:import_",
    "export": "kdpipe.compress.cli:export",
    "train": "kdpipe.student_train.train_cli:train",
    "eval": "kdpipe.student_train.train_cli:eval_cmd",
    "plot": "kdpipe.student_train.train_cli:plot",
    "demo-summary": "kdpipe.student_train.train_cli:demo_summary",
}

_HELP = {
    "doctor": "Print versions, GPUs, cache locations and package conflicts.",
    "teacher": "Prepare the embedded teacher.",
    "corpus": "Build the embedded text corpus.",
    "capture": "Run a teacher over a dataset and write top-k log-probs and hidden states.",
    "inspect": "Summarize a dataset: teacher, settings, codec, sizes.",
    "verify": "Check a dataset's checksums and schema (--deep: decode every row).",
    "dump": "Write decoded arrays of a dataset to an .npz file.",
    "show": "Print a document's tokens and the teacher's top tokens with probabilities.",
    "student": "Build a KDA hybrid student from a teacher (student init).",
    "compress": "Re-encode a dataset with another codec.",
    "fidelity": "Compare codecs on an exact dataset: bytes/token, KL, speed.",
    "import": "Read another tool's dataset (--format distillkit) into a kdpipe dataset.",
    "export": "Write a dataset in another tool's format (--format distillkit|axolotl).",
    "train": "Distill a captured dataset into a KDA hybrid student (YAML config, torchrun).",
    "eval": "Held-out KL, top-1 agreement and cross-entropy of a student checkpoint; "
            "--generate: free-running agreement with the teacher.",
    "plot": "Draw a training run's curves to a PNG.",
    "demo-summary": "Summarize a capture and a training run (make demo).",
}

# command path (as typed after ``kdpipe``) -> example invocations shown at the end of its help
EXAMPLES: dict[str, list[str]] = {
    "": ["kdpipe capture --model \"$(kdpipe teacher prepare --quiet)\" "
         "--data runs/corpus/train.jsonl --out runs/capture --limit 48",
         "kdpipe show runs/capture --doc 0 --rows 12"],
    "doctor": ["kdpipe doctor"],
    "teacher": ["kdpipe teacher prepare"],
    "teacher prepare": ["kdpipe teacher prepare --quiet"],
    "corpus": ["kdpipe corpus build --out runs/corpus/train.jsonl"],
    "corpus build": ["kdpipe corpus build --out runs/corpus/train.jsonl "
                     "--heldout runs/corpus/heldout.jsonl"],
    "capture": ["kdpipe capture --model \"$(kdpipe teacher prepare --quiet)\" "
                "--data runs/corpus/train.jsonl --out runs/capture --top-k 64 "
                "--hidden-layers 0,30 --max-seq-len 128 --codec default"],
    "inspect": ["kdpipe inspect runs/capture", "kdpipe inspect runs/capture --json"],
    "verify": ["kdpipe verify runs/capture", "kdpipe verify runs/capture --deep"],
    "dump": ["kdpipe dump runs/capture --out capture.npz --limit 4"],
    "show": ["kdpipe show runs/capture --doc 3 --rows 20 --top 5"],
    "student": ["kdpipe student init --teacher \"$(kdpipe teacher prepare --quiet)\" "
                "--pattern 3:1 --out runs/student"],
    "student init": ["kdpipe student init --teacher \"$(kdpipe teacher prepare --quiet)\" "
                     "--pattern 3:1 --out runs/student"],
    "compress": ["kdpipe compress runs/capture runs/capture-small --codec small"],
    "fidelity": ["kdpipe fidelity runs/exact --codecs exact,default,small --json rows.json",
                 "kdpipe fidelity runs/exact --codecs default --sampled runs/sampled"],
    "import": ["kdpipe import --format distillkit distillkit_data/ runs/imported"],
    "export": ["kdpipe export --format axolotl runs/capture runs/axolotl",
               "kdpipe export --format distillkit --codec distillkit-recommended "
               "runs/capture runs/distillkit"],
    "train": ["kdpipe train --config student_train/configs/demo.yaml "
              "--set data.path=runs/capture --set out=runs/train"],
    "eval": ["kdpipe eval --student runs/train/final --data runs/heldout --generate"],
    "plot": ["kdpipe plot runs/train --out runs/train/curves.png"],
    "demo-summary": ["kdpipe demo-summary --capture runs/capture --run runs/train"],
}


def _epilog(lines: list[str]) -> str:
    # "\b" keeps click from rewrapping the example lines
    return "Example:\n\n\b\n" + "\n".join(f"  {line}" for line in lines)


def _with_examples(cmd: click.Command, path: str) -> click.Command:
    """Give ``cmd`` (and its subcommands, for a group) their example epilogs."""
    if path in EXAMPLES and not cmd.epilog:
        cmd.epilog = _epilog(EXAMPLES[path])
    if isinstance(cmd, click.Group):
        for name, sub in cmd.commands.items():
            _with_examples(sub, f"{path} {name}")
    return cmd


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attr = COMMANDS[name].split(":")
        return _with_examples(getattr(importlib.import_module(module), attr), name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, _HELP.get(name, "")) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]},
             epilog=_epilog(EXAMPLES[""]))
@click.version_option(package_name="kdpipe")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Offline knowledge distillation: capture -> compressed Parquet shards -> student training."""
    ctx.obj = {"prepare_embedded_teacher": _prepare_embedded_teacher}


def _prepare_embedded_teacher():
    """Training builds students from the embedded teacher, which capture prepares."""
    from kdpipe.capture.teacher import prepare_embedded_teacher
    return prepare_embedded_teacher()


def _describe_os_error(e: OSError) -> str:
    where = " -> ".join(repr(str(f)) for f in (e.filename, e.filename2) if f is not None)
    reason = e.strerror or str(e)
    return f"{where}: {reason}" if where else reason


def main() -> None:
    try:
        cli(standalone_mode=False)
    except KdpipeError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except OSError as e:   # a path that cannot be read or written: no traceback for the user
        click.echo(f"error: {_describe_os_error(e)}", err=True)
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
