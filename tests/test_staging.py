"""fsync of a staged file makes its staging file's directory entry durable: with a
directory sync the first time, and with none once a sync has covered that very file
(each fsync of a file being written used to sync the directory again)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from elvesfs.db import Database
from elvesfs.staging import Staging


@pytest.fixture
def staging(tmp_path: Path, monkeypatch):
    db = Database(str(tmp_path))
    s = Staging(db, str(tmp_path))
    s.dir_syncs = 0
    real = s.sync_dir

    def counted() -> None:
        s.dir_syncs += 1
        real()
    monkeypatch.setattr(s, "sync_dir", counted)
    yield s
    db.close()


def test_the_entry_is_synced_once_per_staging_file(staging):
    os.close(staging.create_file(7))
    staging.sync_entry(7)
    staging.sync_entry(7)
    assert staging.dir_syncs == 1
    staging.remove_file(7)  # sealed; then written again: a new file, a new entry
    os.close(staging.create_file(7))
    staging.sync_entry(7)
    staging.sync_entry(7)
    assert staging.dir_syncs == 2


def test_a_file_found_at_mount_is_synced_at_its_first_fsync(staging):
    # after a kill -9 the file's entry may still be only in the page cache
    os.close(staging.create_file(3))
    staging.sync_entry(3)
    os.close(staging.open_existing(3))
    staging.sync_entry(3)
    assert staging.dir_syncs == 2


def test_a_file_created_again_during_a_sync_is_not_taken_as_synced(staging, monkeypatch):
    os.close(staging.create_file(5))
    inside = threading.Event()
    go_on = threading.Event()
    real = Staging.sync_dir

    def slow() -> None:
        staging.dir_syncs += 1
        inside.set()
        go_on.wait(10)
        real(staging)
    monkeypatch.setattr(staging, "sync_dir", slow)
    t = threading.Thread(target=staging.sync_entry, args=(5,))
    t.start()
    assert inside.wait(10)
    staging.remove_file(5)  # meanwhile: sealed, removed, staged again
    os.close(staging.create_file(5))
    go_on.set()
    t.join(10)
    staging.sync_entry(5)  # the new file's entry was not covered: synced now
    assert staging.dir_syncs == 2
