"""Revocation's logic without a daemon: what counts as re-keyed, the changes between two tables,
and when the auth actor's registry says its table changed."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from inferencecenter.actors.auth import ClientRegistry
from inferencecenter.actors.revocation import changes, fingerprint, table_of
from inferencecenter.protocol import clientsfile
from inferencecenter.protocol.clientsfile import ClientEntry

KEY = "ic-" + "k" * 40
OTHER = "ic-" + "o" * 40


def test_a_new_key_or_role_changes_the_fingerprint_other_fields_do_not() -> None:
    entry = ClientEntry("a", KEY)
    assert fingerprint(replace(entry, api_key=OTHER, api_key_sha256="")) != fingerprint(entry)
    assert fingerprint(replace(entry, role="admin")) != fingerprint(entry)
    same = replace(entry, priority="low", max_sessions=1, description="x")
    assert fingerprint(same) == fingerprint(entry)
    assert fingerprint(clientsfile.hashed(entry)) == fingerprint(entry)  # the hash is what counts
    assert KEY not in fingerprint(entry) and entry.api_key_sha256 not in fingerprint(entry)


def test_changes_name_the_removed_and_the_rekeyed() -> None:
    old = table_of([ClientEntry("a", KEY), ClientEntry("b", KEY), ClientEntry("c", KEY)])
    new = table_of([ClientEntry("a", KEY), ClientEntry("c", OTHER), ClientEntry("d", KEY)])
    assert changes(old, new) == (["b"], ["c"])
    assert changes(new, new) == ([], [])


def test_the_registry_reloads_on_a_change_and_when_forced(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    clientsfile.save(path, [ClientEntry("a", KEY), ClientEntry("b", OTHER)])
    registry = ClientRegistry(path)
    first = dict(registry.table)
    assert set(first) == {"a", "b"}
    assert registry.reload() is False  # nothing changed on disk
    clientsfile.save(path, [ClientEntry("a", KEY), ClientEntry("b", OTHER, priority="low")])
    assert registry.reload() is False and registry.table == first  # read, but nobody revoked
    # A key changed in place, with the old mtime: only a forced reload (SIGHUP) sees it.
    before = path.stat()
    text = path.read_text().replace(OTHER, "ic-" + "p" * 40)
    with open(path, "r+", encoding="utf-8") as handle:
        handle.write(text)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert registry.reload() is False and registry.authenticate("b", OTHER) is not None
    assert registry.reload(force=True) is True
    assert registry.table["b"] != first["b"] and registry.authenticate("b", OTHER) is None


def test_a_broken_edit_keeps_the_last_table(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    clientsfile.save(path, [ClientEntry("a", KEY)])
    registry = ClientRegistry(path)
    table = dict(registry.table)
    clientsfile.write_private(path, {"clients": "nope"})
    assert registry.reload() is False and registry.table == table
    assert registry.authenticate("a", KEY) is not None
