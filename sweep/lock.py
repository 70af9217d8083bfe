"""One run at a time per results directory: an exclusive lock held for the life of a run.

Two sweeps on one ``--out`` would rotate each other's ``run-latest`` and write the same files.
The lock is an ``flock`` on ``<out>/.lock``: the kernel releases it when its process dies, so a
lock left by a killed run is free to take at once, and the file's text (who, where, since when)
is only information for the message a second run prints. Local file systems and NFSv4 honour
``flock``; a results directory shared over a file system that does not is not protected.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from types import TracebackType

from sweep.errors import RunDirError

LOCK_NAME = ".lock"


class RunLock:
    """``with RunLock(out):`` holds ``out``'s lock, or raises RunDirError naming its holder."""

    def __init__(self, root: Path, command: list[str] | None = None) -> None:
        self.path = root / LOCK_NAME
        self.command = command if command is not None else sys.argv
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunDirError(
                f"{self.path.parent}: another run is using this results directory "
                f"({self.holder()}); wait for it to finish or give another --out"
            ) from None
        except OSError as exc:
            os.close(fd)
            raise RunDirError(f"{self.path}: cannot lock the results directory: {exc}") from None
        # The lock is ours: say who holds it (a killed holder's text is simply overwritten).
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": self.command,
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self._fd = fd

    def holder(self) -> str:
        """Who holds the lock, in words, from the lock file's text."""
        try:
            info = json.loads(self.path.read_text(encoding="utf-8"))
            command = " ".join(str(a) for a in info.get("command", []))
            return f"pid {info['pid']} on {info['host']} since {info['since']}: {command}"
        except (OSError, ValueError, KeyError, TypeError):
            return "holder unknown"

    def release(self) -> None:
        if self._fd is not None:
            # Leave the file (unlinking it would race with a waiting run); empty it.
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
