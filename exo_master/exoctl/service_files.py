"""The files that run exo-master or exo-worker as a background service. Pure: text in, text out.

- macOS: a launchd agent (`~/Library/LaunchAgents/org.exo.ROLE.plist`): started at login and
  kept alive (`KeepAlive`, restarted at most every `ThrottleInterval` seconds), its output in
  `~/Library/Logs/exo/ROLE.log`. `ProcessType Interactive`: macOS does not throttle it like a
  background job, which matters for inference.
- Linux: a systemd user unit (`~/.config/systemd/user/exo-ROLE.service`), `Restart=always`,
  output in the journal (`journalctl --user -u exo-ROLE`).

Both run the daemon's own command line, as given to `exoctl service install ROLE ...`, in the
directory it was installed from (relative key paths keep working).
"""

from __future__ import annotations

import enum
import plistlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ROLES = ("master", "worker")
COMMANDS = {"master": "exo-master", "worker": "exo-worker"}


class Platform(enum.StrEnum):
    MACOS = "macos"
    LINUX = "linux"


@dataclass(frozen=True, slots=True)
class ServiceSpec:
    role: str  # master | worker
    executable: Path  # absolute path of exo-master / exo-worker
    args: tuple[str, ...]  # the daemon's own options
    working_directory: Path
    home: Path

    @property
    def label(self) -> str:
        return f"org.exo.{self.role}"

    @property
    def unit_name(self) -> str:
        return f"exo-{self.role}.service"

    @property
    def log_file(self) -> Path:
        return self.home / "Library" / "Logs" / "exo" / f"{self.role}.log"

    def path(self, platform: Platform) -> Path:
        """Where the file goes."""
        if platform is Platform.MACOS:
            return self.home / "Library" / "LaunchAgents" / f"{self.label}.plist"
        return self.home / ".config" / "systemd" / "user" / self.unit_name

    def render(self, platform: Platform) -> str:
        return launchd_plist(self) if platform is Platform.MACOS else systemd_unit(self)


def launchd_plist(spec: ServiceSpec) -> str:
    agent = {
        "Label": spec.label,
        "ProgramArguments": [str(spec.executable), *spec.args],
        "WorkingDirectory": str(spec.working_directory),
        "RunAtLoad": True,
        "KeepAlive": True,
        "ThrottleInterval": 5,
        "ProcessType": "Interactive",
        "StandardOutPath": str(spec.log_file),
        "StandardErrorPath": str(spec.log_file),
        "EnvironmentVariables": {"PYTHONUNBUFFERED": "1", "EXO_LOG_FORMAT": "json"},
    }
    return plistlib.dumps(agent, sort_keys=False).decode()


_SAFE = re.compile(r"^[A-Za-z0-9_@%+=:,./-]+$")


def systemd_quote(arg: str) -> str:
    """One ExecStart word: systemd expands `%` specifiers and `$` variables, and splits on spaces."""
    escaped = arg.replace("%", "%%").replace("$", "$$")
    if _SAFE.match(arg):
        return escaped
    return '"' + escaped.replace("\\", "\\\\").replace('"', '\\"') + '"'


def systemd_unit(spec: ServiceSpec) -> str:
    command = " ".join(systemd_quote(word) for word in (str(spec.executable), *spec.args))
    return "\n".join(
        [
            "[Unit]",
            f"Description=exo {spec.role} ({COMMANDS[spec.role]}), installed by exoctl service",
            "After=network-online.target",
            "Wants=network-online.target",
            "",
            "[Service]",
            "Type=exec",
            f"ExecStart={command}",
            # A path setting, not a command line: taken verbatim (spaces too), only specifiers expand.
            f"WorkingDirectory={str(spec.working_directory).replace('%', '%%')}",
            "Environment=PYTHONUNBUFFERED=1 EXO_LOG_FORMAT=json",
            "Restart=always",
            "RestartSec=5",
            # The daemons end their work on SIGTERM within a few seconds.
            "KillSignal=SIGTERM",
            "TimeoutStopSec=20",
            "",
            "[Install]",
            "WantedBy=default.target",
            "",
        ]
    )


def refuse_bad_args(args: Sequence[str]) -> str | None:
    """Why these daemon options cannot make a service (None when they can)."""
    for arg in args:
        if arg in ("--help", "--version", "--install-completion", "--show-completion"):
            return f"{arg} makes the daemon exit at once: a service needs its serving options"
        if "\n" in arg or "\x00" in arg:
            return "an option holds a newline or NUL"
    return None
