"""`exoctl service install|uninstall|status master|worker`: run a daemon in the background.

    exoctl service install worker --cluster home --secret-key ~/.config/exo/keys/studio.key_secret \\
        --master-key ~/.config/exo/keys/master.key
    exoctl service install worker --print ...     show the file, install nothing
    exoctl service status worker
    exoctl service uninstall worker

Everything after the role is the daemon's own command line. The files are made in
`exoctl.service_files`; here they are written, loaded (`launchctl bootstrap` on macOS,
`systemctl --user enable --now` on Linux) and asked about.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from exo_master.exoctl.service_files import COMMANDS, ROLES, Platform, ServiceSpec, refuse_bad_args

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    help="Run exo-master or exo-worker as a background service (launchd on macOS, systemd on Linux).",
)
PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True}
Role = Annotated[str, typer.Argument(metavar="master|worker", help="Which daemon.", show_default=False)]
PlatformOption = Annotated[
    Platform | None,
    typer.Option("--platform", show_default=False, help="Default: this machine's (macos or linux)."),
]


def _fail(message: str, code: int = 1) -> typer.Exit:
    typer.echo(f"exoctl: {message}", err=True)
    return typer.Exit(code)


def _platform(chosen: Platform | None) -> Platform:
    if chosen is not None:
        return chosen
    if sys.platform == "darwin":
        return Platform.MACOS
    if sys.platform.startswith("linux"):
        return Platform.LINUX
    raise _fail(f"no service manager known on {sys.platform}: run the daemon yourself", 2)


def _role(role: str) -> str:
    if role not in ROLES:
        raise _fail(f"the role is master or worker, got {role!r}", 2)
    return role


def executable(role: str) -> Path:
    """The daemon installed next to this exoctl (the same environment), else the one on PATH."""
    name = COMMANDS[role]
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return beside
    found = shutil.which(name)
    return Path(found) if found else beside


def spec_for(role: str, args: list[str]) -> ServiceSpec:
    return ServiceSpec(
        role=role,
        executable=executable(role),
        args=tuple(args),
        working_directory=Path.cwd(),
        home=Path.home(),
    )


def _run(command: list[str], optional: bool = False) -> subprocess.CompletedProcess[str]:
    """Run a service manager command; `optional`: its absence is an empty failed answer."""
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        if optional:
            return subprocess.CompletedProcess(command, 127, "", f"{command[0]} not found")
        raise _fail(f"{command[0]} is not available here (use --print, or --no-load)", 2) from None
    except subprocess.TimeoutExpired:
        raise _fail(f"{' '.join(command)} did not answer in 30 s", 2) from None


def _checked(command: list[str]) -> None:
    result = _run(command)
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()
        raise _fail(f"{' '.join(command)} failed: {detail[-1] if detail else result.returncode}")


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, prefix=f".{path.name}.") as f:
        f.write(text)
    os.replace(f.name, path)


def _domain() -> str:
    return f"gui/{os.getuid()}"


def _load(spec: ServiceSpec, platform: Platform) -> None:
    path = spec.path(platform)
    if platform is Platform.MACOS:
        spec.log_file.parent.mkdir(parents=True, exist_ok=True)
        _run(["launchctl", "bootout", f"{_domain()}/{spec.label}"])  # a previous version, if any
        _checked(["launchctl", "bootstrap", _domain(), str(path)])
    else:
        _checked(["systemctl", "--user", "daemon-reload"])
        _checked(["systemctl", "--user", "enable", spec.unit_name])
        _checked(["systemctl", "--user", "restart", spec.unit_name])


@app.command(context_settings=PASS_THROUGH)
def install(
    ctx: typer.Context,
    role: Role,
    print_only: Annotated[
        bool, typer.Option("--print", help="Print the file that would be installed; change nothing.")
    ] = False,
    no_load: Annotated[bool, typer.Option("--no-load", help="Write the file but do not start it.")] = False,
    platform: PlatformOption = None,
) -> None:
    """Write the service file for ROLE with the daemon options that follow, and start it."""
    role, target = _role(role), _platform(platform)
    args = list(ctx.args)
    problem = refuse_bad_args(args)
    if problem is not None:
        raise _fail(problem, 2)
    spec = spec_for(role, args)
    text = spec.render(target)
    if print_only:
        typer.echo(text, nl=False)
        return
    if not spec.executable.exists():
        raise _fail(f"{spec.executable} does not exist: install exo-master first", 2)
    path = spec.path(target)
    _write(path, text)
    typer.echo(f"wrote {path}")
    if no_load:
        return
    _load(spec, target)
    where = spec.log_file if target is Platform.MACOS else f"journalctl --user -u {spec.unit_name}"
    typer.echo(f"started {COMMANDS[role]} as a service; logs: {where}")


@app.command()
def uninstall(role: Role, platform: PlatformOption = None) -> None:
    """Stop the ROLE service and remove its file."""
    role, target = _role(role), _platform(platform)
    spec = spec_for(role, [])
    path = spec.path(target)
    if target is Platform.MACOS:
        _run(["launchctl", "bootout", f"{_domain()}/{spec.label}"], optional=True)
    else:
        _run(["systemctl", "--user", "disable", "--now", spec.unit_name], optional=True)
    if path.exists():
        path.unlink()
        if target is Platform.LINUX:
            _run(["systemctl", "--user", "daemon-reload"], optional=True)
        typer.echo(f"removed {path}")
    else:
        typer.echo(f"no {path}: nothing to remove")


def _status(spec: ServiceSpec, platform: Platform) -> dict[str, object]:
    path = spec.path(platform)
    found: dict[str, object] = {"role": spec.role, "file": str(path), "installed": path.exists()}
    if platform is Platform.MACOS:
        result = _run(["launchctl", "print", f"{_domain()}/{spec.label}"], optional=True)
        fields = dict(line.strip().split(" = ", 1) for line in result.stdout.splitlines() if " = " in line)
        found |= {
            "loaded": result.returncode == 0,
            "state": fields.get("state", "not loaded"),
            "pid": int(fields["pid"]) if fields.get("pid", "").isdigit() else None,
            "log": str(spec.log_file),
        }
    else:
        result = _run(
            ["systemctl", "--user", "show", spec.unit_name, "-p", "ActiveState", "-p", "SubState",
             "-p", "MainPID"],
            optional=True,
        )  # fmt: skip
        fields = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
        pid = fields.get("MainPID", "0")
        found |= {
            "loaded": result.returncode == 0 and fields.get("ActiveState") not in (None, "inactive"),
            "state": f"{fields.get('ActiveState', 'unknown')} ({fields.get('SubState', '?')})",
            "pid": int(pid) if pid.isdigit() and pid != "0" else None,
            "log": f"journalctl --user -u {spec.unit_name}",
        }
    return found


@app.command()
def status(
    role: Role,
    platform: PlatformOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Whether the ROLE service is installed and running, its pid and where its logs are."""
    role, target = _role(role), _platform(platform)
    found = _status(spec_for(role, []), target)
    if as_json:
        typer.echo(json.dumps(found))
        return
    for key, value in found.items():
        typer.echo(f"{key + ':':<11}{value if value is not None else '-'}")
