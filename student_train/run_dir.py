"""Where a training run may write, and what ``--overwrite`` may delete.

kdpipe deletes only directories it can tell it wrote, so a mistyped ``out`` costs no data:

* A **run directory** holds the marker file ``.kdpipe-run`` (written when the trainer creates
  the directory), or, for runs written before the marker existed, ``config.yaml`` beside a
  ``checkpoints/`` directory holding kdpipe checkpoints.
* ``out`` must be new, empty, or a run directory; any other directory is refused (training
  into it would mix the run's files with files kdpipe did not write, and replace a
  ``config.yaml`` of the user's).
* ``--overwrite`` deletes a run directory only when everything in it is something the trainer
  writes (``RUN_ENTRIES``; under ``checkpoints/`` only checkpoint directories); a foreign
  file, such as a user's notes, makes it refuse and name the file.
* ``out`` is never an input of the run (``data.path``, ``eval.data``, ``student.path``,
  the teacher) or a directory above one, and ``--overwrite`` never deletes the working
  directory or a directory above it.

Every check here reads only; ``remove_run`` deletes, after the trainer has validated the
configuration and the data.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from kdpipe.compress import check_writable
from kdpipe.schemas import ConfigError

from .checkpoint import CHECKPOINTS, list_checkpoints, remove_checkpoint

MARKER = ".kdpipe-run"
RUN_ENTRIES = frozenset({MARKER, "config.yaml", "metrics.jsonl", "tensorboard", CHECKPOINTS,
                         "final", "student-init", "curves.png"})
_TMP_ENTRY = re.compile(r"\.tmp-(metrics\.jsonl|final|student-init)(-\w+)?")
_CHECKPOINT_ENTRY = re.compile(r"(\.tmp-)?step-\d+")


def local_path(uri: str | None) -> Path | None:
    """The local directory of a dataset location, or None for a filesystem URL."""
    if not uri:
        return None
    if uri.startswith("file://"):
        return Path(uri[len("file://"):])
    return None if "://" in uri else Path(uri)


def is_run_dir(path: Path) -> bool:
    """Whether ``path`` is a kdpipe training run directory (see the module docstring)."""
    if (path / MARKER).is_file():
        return True
    return (path / "config.yaml").is_file() and bool(list_checkpoints(path))


def foreign_entries(run: Path) -> list[str]:
    """Entries of a run directory that the trainer does not write, relative to ``run``."""
    foreign = [p.name for p in run.iterdir()
               if p.name not in RUN_ENTRIES and not _TMP_ENTRY.fullmatch(p.name)]
    ckpts = run / CHECKPOINTS
    if ckpts.is_dir():
        foreign += [f"{CHECKPOINTS}/{p.name}" for p in ckpts.iterdir()
                    if not (p.is_dir() and _CHECKPOINT_ENTRY.fullmatch(p.name))]
    elif ckpts.exists():
        foreign.append(CHECKPOINTS)
    return sorted(foreign)


def _within(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def _listing(path: Path, limit: int = 5) -> str:
    names = sorted(p.name for p in path.iterdir())
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit
                                       else "")


def check_out(out: Path, inputs: dict[str, Path], *, overwrite: bool) -> None:
    """Refuse an ``out`` that training could not write, or that writing or ``--overwrite``
    would damage: an input or a directory above one, the working directory (for
    ``--overwrite``), a directory that is not a run, a run holding foreign files (for
    ``--overwrite``), or a place that is not writable. Reads only."""
    where = out.resolve()
    for label, path in inputs.items():
        if _within(path.resolve(), where):
            what = "is" if path.resolve() == where else "contains"
            raise ConfigError(f"out {out} {what} the run's {label} {path}: a run writes, rotates "
                              f"and with --overwrite deletes its out directory, so it must not "
                              f"hold an input; choose another out")
    if overwrite and _within(Path.cwd().resolve(), where):
        raise ConfigError(f"out {out} is the working directory or a directory above it; "
                          f"--overwrite never deletes it; choose a run directory of its own")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out {out} is a file, not a directory")
    if overwrite and out.is_symlink():
        raise ConfigError(f"out {out} is a symbolic link; --overwrite deletes only a run "
                          f"directory itself: give its real path")
    if out.is_dir() and any(out.iterdir()):
        if not is_run_dir(out):
            raise ConfigError(f"out {out} is not empty and is not a kdpipe training run (no "
                              f"{MARKER}; it holds {_listing(out)}); kdpipe writes runs only into "
                              f"new or empty directories or its own runs: choose another out")
        foreign = foreign_entries(out) if overwrite else []
        if foreign:
            raise ConfigError(f"--overwrite: out {out} holds files a training run does not "
                              f"write ({', '.join(foreign[:5])}); kdpipe deletes only what it "
                              f"wrote: move them or choose another out")
    check_writable(out)


def remove_run(out: Path) -> None:
    """Delete a run directory that ``check_out(overwrite=True)`` accepted: checkpoints first
    (each made invisible before it goes), the marker last, so a kill halfway leaves a
    directory still recognized as a run (and resumable from no half-deleted checkpoint)."""
    for _, path in list_checkpoints(out):
        remove_checkpoint(path)
    for entry in out.iterdir():
        if entry.name != MARKER:
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    (out / MARKER).unlink(missing_ok=True)
    out.rmdir()


def mark_run(out: Path) -> None:
    """Create ``out`` (if needed) and its marker: from now on kdpipe may replace it."""
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("kdpipe training run: `kdpipe train --overwrite` may delete "
                              "this directory\n")
