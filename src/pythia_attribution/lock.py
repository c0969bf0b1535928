"""One exclusive lock per profile's results: ``results/<profile>/.lock``.

The lock is an operating-system file lock (``filelock``'s ``flock`` on Linux): the kernel drops
it when the process holding it exits, however it exits, so a killed run never leaves a lock that
blocks the next one. ``.lock.holder`` next to it says who holds it (pid, host, command, start
time) for the message a second run prints; it is informational only, never trusted as the lock.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import Iterator

from filelock import FileLock, Timeout

from pythia_attribution import paths
from pythia_attribution.errors import LockedError
from pythia_attribution.tables import write_text_atomic

LOCK_FILE = ".lock"
HOLDER_FILE = ".lock.holder"


def _holder(root) -> str:
    try:
        info = json.loads((root / HOLDER_FILE).read_text())
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["started"]))
        return f"pid {info['pid']} on {info['host']} (`{info['command']}`, started {started})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another run (it has not said who it is yet)"


@contextlib.contextmanager
def profile_lock(profile: str, wait: float = 0.0, command: str = "") -> Iterator[None]:
    """Hold the profile's lock for the duration; wait up to ``wait`` seconds for it, then stop
    with a message naming the run that holds it."""
    root = paths.results_root() / profile
    root.mkdir(parents=True, exist_ok=True)
    lock = FileLock(root / LOCK_FILE, timeout=wait)
    try:
        lock.acquire()
    except Timeout:
        waited = f" after waiting {wait:g} s" if wait else ""
        raise LockedError(
            f"{root} is in use by {_holder(root)}{waited}; wait for it to finish, or pass "
            "--wait SECONDS to queue behind it"
        ) from None
    try:
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": command or " ".join(["python -m pythia_attribution", *sys.argv[1:]]),
            "started": time.time(),
        }
        write_text_atomic(root / HOLDER_FILE, json.dumps(info) + "\n")
        yield
    finally:
        with contextlib.suppress(OSError):
            (root / HOLDER_FILE).unlink()
        lock.release()
