"""`elvesfs scrub MNT`: verify every stored chunk while the file system stays mounted.

Bit rot is silent until something reads the damaged bytes; a scrub reads them all
first. This process opens the store read-only (LMDB allows readers beside the daemon)
and checks each chunk, and the chain of chunks it is a delta of, from one snapshot, so
chunks the daemon re-codes meanwhile never look damaged. It reports:

- protected chunks whose parity repairs their damage (reads already return the exact
  bytes); with ``--repair`` the daemon writes them back repaired, so the next damage to
  those streams is survivable again;
- chunks that do not verify, and the files that hold them, each with the
  `elvesfs salvage` command that writes out what it still holds.

Checking the namespace and reference counts needs a quiescent store:
`elvesfs fsck` after unmounting.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .chunkstore import ChunkStore
from .control import request
from .db import Database
from .errors import CliError
from .verify import check_chunks, chunk_count, damaged_files
from .mounts import mount_of
from .namespace import Namespace

log = logging.getLogger(__name__)


def _bar(total: int, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, desc="scrubbing chunks", unit="chunk", disable=not enabled,
                file=sys.stderr, leave=False)


def main(a: argparse.Namespace) -> int:
    """0 when every chunk verifies (after --repair: or was mended), 1 otherwise."""
    mp, store = mount_of(a.mountpoint)
    db = Database(store, readonly=True)
    try:
        chunks = ChunkStore(db)
        mendable, bad, n = [], set(), 0
        with _bar(chunk_count(db), sys.stderr.isatty()) as bar:
            for cid, c in check_chunks(db, chunks):
                n += 1
                if c.mendable:
                    mendable.append(cid)
                    log.warning("chunk %s: protected stream(s) %s damaged, repairable",
                                cid.hex(), ", ".join(c.mendable))
                if c.error:
                    bad.add(cid)
                    log.warning("chunk %s does not verify: %s", cid.hex(), c.error)
                bar.update(1)
        files = damaged_files(db, Namespace(db), bad)
    finally:
        db.close()
    for _, path, hit in files:
        where = os.path.join(mp, path.lstrip("/"))
        print(f"damaged: {where}: {hit} chunk(s) do not verify, reads of them fail with EIO; "
              f"`elvesfs salvage {where} OUT` writes out what it still holds")
    mended = 0
    if a.repair:
        for cid in mendable:
            ans = request(store, f"mend {cid.hex()}", timeout=600)
            if not ans.startswith("ok"):
                raise CliError(f"the daemon could not mend chunk {cid.hex()}: {ans}")
            mended += ans != "ok -"
    print(f"elvesfs scrub: {mp}: {n} chunks, {len(bad)} do not verify, "
          f"{len(mendable)} protected with repairable damage"
          + (f" ({mended} mended)" if a.repair else
             " (run with --repair to write them back)" if mendable else ""))
    return 1 if bad or (mendable and not a.repair) else 0
