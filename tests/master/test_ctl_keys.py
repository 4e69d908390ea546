"""`exoctl keys generate`: files, modes, the printed fingerprint, one-line errors."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner

from exo_master.exoctl.cli import app
from protocol import keys


def test_generate_prints_paths_and_fingerprint(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["keys", "generate", "mac-mini-2", "--dir", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)
    assert stat.S_IMODE(Path(shown["secret"]).stat().st_mode) == 0o600
    assert shown["fingerprint"] == keys.fingerprint(keys.load_public(Path(shown["public"])))
    assert Path(shown["authorized"]).is_dir()


def test_default_dir_is_under_xdg_config_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    result = CliRunner().invoke(app, ["keys", "generate", "master"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "exo" / "keys" / "master.key_secret").exists()
    assert "fingerprint" in result.output
    again = CliRunner().invoke(app, ["keys", "generate", "master"])
    assert again.exit_code == 1 and "already exists" in again.output
