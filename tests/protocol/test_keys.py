"""CURVE key files: generation, modes, loading, fingerprints, the default directory."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
import zmq

from protocol import keys


def test_generate_writes_a_public_file_and_a_private_secret(tmp_path: Path) -> None:
    public, secret = keys.generate(tmp_path / "k", "node-a")
    assert (public.name, secret.name) == ("node-a.key", "node-a.key_secret")
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    pair = keys.load_keypair(secret)
    assert keys.load_public(public) == pair.public
    assert zmq.curve_public(pair.secret) == pair.public
    assert sorted(p.name for p in (tmp_path / "k").iterdir()) == ["node-a.key", "node-a.key_secret"]


def test_generate_never_overwrites(tmp_path: Path) -> None:
    keys.generate(tmp_path, "m")
    with pytest.raises(keys.KeyFileError, match="already exists"):
        keys.generate(tmp_path, "m")


@pytest.mark.parametrize("name", ["", "../x", "a/b", "-x", "x" * 65])
def test_bad_names_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(keys.KeyFileError):
        keys.generate(tmp_path, name)


def test_a_public_file_is_not_a_secret_and_garbage_is_not_a_key(tmp_path: Path) -> None:
    public, _ = keys.generate(tmp_path, "w")
    with pytest.raises(keys.KeyFileError, match="no secret key"):
        keys.load_keypair(public)
    junk = tmp_path / "junk.key"
    junk.write_text("hello\n")
    with pytest.raises(keys.KeyFileError, match="not a CURVE key file"):
        keys.load_public(junk)
    with pytest.raises(keys.KeyFileError, match="cannot read"):
        keys.load_public(tmp_path / "missing.key")


def test_fingerprint_is_stable_short_and_distinct() -> None:
    a, _ = zmq.curve_keypair()
    b, _ = zmq.curve_keypair()
    assert keys.fingerprint(a) == keys.fingerprint(a.decode())
    assert len(keys.fingerprint(a)) == 16 and keys.fingerprint(a) != keys.fingerprint(b)


def test_default_dir_honours_xdg_config_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert keys.default_keys_dir() == tmp_path / "exo" / "keys"
    monkeypatch.delenv("XDG_CONFIG_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert keys.default_keys_dir() == tmp_path / "home" / ".config" / "exo" / "keys"
