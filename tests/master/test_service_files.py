"""`exoctl service`: the launchd agent and the systemd user unit it writes, checked by plistlib and
by `systemd-analyze verify` (where installed), and install/uninstall into a scratch home."""

from __future__ import annotations

import plistlib
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from exo_master.exoctl.cli import app as exoctl_app
from exo_master.exoctl.service_files import Platform, ServiceSpec, systemd_quote

runner = CliRunner()
AWKWARD = ["--cluster", "home", "--secret-key", "/Users/marie/my keys/studio.key_secret",
           "--api-key", 'a"b$c%d\\e', "--model", "mlx-community/Llama-3.2-1B-Instruct-4bit"]  # fmt: skip


def spec(role: str = "worker", args: list[str] = AWKWARD, executable: Path | None = None) -> ServiceSpec:
    return ServiceSpec(
        role=role,
        executable=executable or Path("/opt/exo/bin/exo-worker"),
        args=tuple(args),
        working_directory=Path("/Users/marie/exo lab"),
        home=Path("/Users/marie"),
    )


def test_the_launchd_agent_round_trips_through_plistlib() -> None:
    agent = plistlib.loads(spec().render(Platform.MACOS).encode())
    assert agent["Label"] == "org.exo.worker"
    assert agent["ProgramArguments"] == ["/opt/exo/bin/exo-worker", *AWKWARD]
    assert agent["KeepAlive"] is True and agent["RunAtLoad"] is True
    assert (
        agent["StandardOutPath"] == agent["StandardErrorPath"] == "/Users/marie/Library/Logs/exo/worker.log"
    )
    assert agent["WorkingDirectory"] == "/Users/marie/exo lab"
    assert spec().path(Platform.MACOS) == Path("/Users/marie/Library/LaunchAgents/org.exo.worker.plist")


def _exec_start(unit: str) -> list[str]:
    line = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    words = shlex.split(line.removeprefix("ExecStart="))
    return [w.replace("%%", "%").replace("$$", "$") for w in words]


def test_the_systemd_unit_runs_exactly_the_daemon_command_line() -> None:
    unit = spec().render(Platform.LINUX)
    assert _exec_start(unit) == ["/opt/exo/bin/exo-worker", *AWKWARD]
    assert "Restart=always" in unit and "WantedBy=default.target" in unit
    assert spec("master").path(Platform.LINUX) == Path("/Users/marie/.config/systemd/user/exo-master.service")
    assert systemd_quote("50%") == "50%%" and systemd_quote("$HOME") == '"$$HOME"'


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    daemon = Path(sys.prefix) / "bin" / "exo-worker"
    if not daemon.exists():
        pytest.skip("exo-worker is not installed in this environment")
    unit = tmp_path / "exo-worker.service"
    unit.write_text(spec(executable=daemon).render(Platform.LINUX))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    # It exits 0 on mere warnings ("Failed to parse ..., ignoring"): any output is a finding.
    assert result.returncode == 0 and not result.stderr.strip() and not result.stdout.strip(), result
    broken = tmp_path / "exo-broken.service"
    broken.write_text(unit.read_text().replace("Type=exec", "Type=nonsense"))
    found = subprocess.run(
        ["systemd-analyze", "verify", str(broken)], capture_output=True, text=True, timeout=60
    )
    assert "nonsense" in found.stderr  # the check can fail


@pytest.mark.parametrize(("platform", "marker"), [("linux", "[Service]"), ("macos", "<plist")])
def test_install_print_shows_the_file_and_writes_nothing(
    platform: str, marker: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    result = runner.invoke(
        exoctl_app, ["service", "install", "worker", "--print", "--platform", platform, "--cluster", "home"]
    )
    assert result.exit_code == 0, result.output
    assert marker in result.output and "--cluster" in result.output and "home" in result.output
    assert not any(tmp_path.iterdir())


def test_install_writes_and_uninstall_removes_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    args = ["service", "install", "master", "--no-load", "--platform", "linux", "--host", "0.0.0.0"]
    result = runner.invoke(exoctl_app, args)
    assert result.exit_code == 0, result.output
    unit = tmp_path / ".config" / "systemd" / "user" / "exo-master.service"
    assert _exec_start(unit.read_text())[1:] == ["--host", "0.0.0.0"]
    removed = runner.invoke(exoctl_app, ["service", "uninstall", "master", "--platform", "linux"])
    assert removed.exit_code == 0, removed.output
    assert not unit.exists()


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["--cluster", "a\nb"]])
def test_options_that_cannot_make_a_service_are_refused(args: list[str]) -> None:
    result = runner.invoke(exoctl_app, ["service", "install", "worker", "--print", "--", *args])
    assert result.exit_code == 2, result.output
    bad_role = runner.invoke(exoctl_app, ["service", "install", "router", "--print"])
    assert bad_role.exit_code == 2 and "master or worker" in bad_role.output
