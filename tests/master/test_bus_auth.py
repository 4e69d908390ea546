"""The authorized-keys directory as the ZAP credentials provider: admit, refuse and count, reload."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from exo_master.bus.curve import AuthCounters, AuthorizedKeys, load_master_curve
from protocol import keys


def test_admits_listed_keys_refuses_and_counts_the_others(tmp_path: Path) -> None:
    authorized = tmp_path / "authorized"
    public, _ = keys.generate(authorized, "w1")
    outsider, _ = keys.generate(tmp_path / "elsewhere", "w2")
    counters = AuthCounters()
    directory = AuthorizedKeys(authorized, counters)
    directory.reload()
    assert directory.callback("*", keys.load_public(public)) is True
    for _ in range(3):
        assert directory.callback("*", keys.load_public(outsider)) is False
    assert counters.admitted == 1 and counters.refusals == {"unknown_key": 3}


def test_a_key_added_or_removed_is_seen_at_the_next_poll(tmp_path: Path) -> None:
    authorized = tmp_path / "authorized"
    authorized.mkdir()
    directory = AuthorizedKeys(authorized, AuthCounters())
    assert directory.reload_if_changed() is True  # the first read
    assert directory.reload_if_changed() is False
    public, _ = keys.generate(tmp_path / "w", "w")
    (authorized / "w.key").write_bytes(public.read_bytes())
    assert directory.reload_if_changed() is True
    assert directory.keys == {keys.load_public(public)}
    os.remove(authorized / "w.key")
    assert directory.reload_if_changed() is True and directory.keys == set()


def test_a_broken_file_keeps_the_previous_keys(tmp_path: Path) -> None:
    authorized = tmp_path / "authorized"
    public, _ = keys.generate(authorized, "w")
    directory = AuthorizedKeys(authorized, AuthCounters())
    directory.reload()
    (authorized / "half-copied.key").write_text("not a key\n")
    directory.reload_if_changed()
    assert directory.keys == {keys.load_public(public)}


def test_curve_needs_both_files_and_an_existing_directory(tmp_path: Path) -> None:
    _, secret = keys.generate(tmp_path, "master")
    assert load_master_curve(None, None) is None
    with pytest.raises(keys.KeyFileError, match="both"):
        load_master_curve(secret, None)
    with pytest.raises(keys.KeyFileError, match="does not exist"):
        load_master_curve(secret, tmp_path / "nowhere")
    curve = load_master_curve(secret, tmp_path)
    assert curve is not None and curve.fingerprint == keys.load_keypair(secret).fingerprint
