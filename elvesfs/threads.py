"""Background worker threads: an OS-visible name and a lower CPU priority.

The daemon runs its FUSE requests on one event-loop thread, and a seal's coders and
committer beside it on the same (often 2) CPUs. Given the CPU on equal terms, a metadata
request during a 1 GiB `cp` waits in the run queue behind the coders. With the coders at
nice 5 and the committer at 3, create + stat meanwhile (scripts/bench_fs.py's busy
phase, 5 A/B pairs, medians): median 1.48 -> 1.12 ms, p99 18.5 -> 16.9 ms, max 28.5 ->
21.4 ms; the write itself no slower (docs/MEASUREMENTS.md). Any user may lower a
thread's priority, so this needs no privilege; the names show in `top -H`, `perf` and
py-spy.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Callable

log = logging.getLogger(__name__)

CODER_NICE = 5  # the seal's coding threads
COMMITTER_NICE = 3  # its one committer: the pipeline's serial stage, so less lowered


def background(name: str, nice: int) -> Callable[[], None]:
    """A thread initializer (ThreadPoolExecutor's) naming the thread and setting its nice
    value `nice` above the main thread's; best effort, where Linux's /proc or
    setpriority is missing (a thread that starts at a higher nice value keeps it: only
    root may lower a nice value)."""
    def init() -> None:
        tid = threading.get_native_id()
        try:
            with open(f"/proc/self/task/{tid}/comm", "w") as f:
                f.write(name[:15])  # the kernel keeps 15 bytes
        except OSError as exc:
            log.debug("cannot name thread %d: %s", tid, exc)
        try:
            # relative to the main thread's value: a thread inherits its creator's, and
            # a pool's threads start from whichever thread first submits to it
            target = min(19, os.getpriority(os.PRIO_PROCESS, os.getpid()) + nice)
            if os.getpriority(os.PRIO_PROCESS, tid) < target:
                os.setpriority(os.PRIO_PROCESS, tid, target)
        except OSError as exc:
            log.debug("cannot lower the priority of thread %d: %s", tid, exc)
    return init
