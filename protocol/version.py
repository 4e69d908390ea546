"""The installed package's version, shown by `--version` on exo-master, exo-worker and exoctl."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

DISTRIBUTION = "exo-master"  # one distribution ships the three commands


def package_version() -> str:
    """The version from the installed package metadata (pyproject.toml), or "unknown" when run
    from a source tree that was never installed."""
    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:
        return "unknown"


def version_line(program: str) -> str:
    return f"{program} {package_version()}"
