"""What a manifest's ``file = "..."`` prompt may be, and its text.

A prompt's text is written into every artefact and sent with the LLM bundles, so a prompt file
is checked before it is opened: a regular file of at most 1 MiB, never under /proc, /sys or
/dev, and (unless allowed) inside the top-level manifest's folder after symlinks.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

PROMPT_FILE_MAX_BYTES = 2**20
SYSTEM_DIRS = (Path("/proc"), Path("/sys"), Path("/dev"))  # refused even when allowed anywhere


def read_prompt_file(file: Path, root: Path | None) -> str:
    """The UTF-8 text of ``file`` less one final newline (an editor's); ``root``: the folder it
    must resolve into, or None for anywhere. Raises ValueError saying what is wrong."""
    try:
        real = file.resolve()
        st = real.stat() if real.exists() else None
    except (OSError, RuntimeError) as exc:  # a symlink loop, a folder we may not list
        raise ValueError(f"cannot inspect prompt file {file}: {exc}") from None
    as_written = Path(os.path.normpath(file))  # /dev/stdin resolves through /proc/self/fd
    if any(p.is_relative_to(d) for p in (as_written, real) for d in SYSTEM_DIRS):
        raise ValueError(f"{file} is a system file (under /proc, /sys or /dev), not a prompt")
    if st is None:
        raise ValueError(f"prompt file not found: {file}")
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{file} is not a regular file (a directory, FIFO, socket or device)")
    if root is not None and not real.is_relative_to(root):
        shown = str(file) if real == as_written else f"{file} (resolves to {real})"
        raise ValueError(
            f"{shown} is outside the manifest's folder {root}: move it there, "
            "or allow it with --prompt-files-anywhere"
        )
    too_big = f"{file} is larger than {PROMPT_FILE_MAX_BYTES} bytes (1 MiB)"
    if st.st_size > PROMPT_FILE_MAX_BYTES:
        raise ValueError(too_big)
    try:
        with open(real, "rb") as f:
            data = f.read(PROMPT_FILE_MAX_BYTES + 1)
    except OSError as exc:
        raise ValueError(f"cannot read prompt file {file}: {exc.strerror}") from None
    if len(data) > PROMPT_FILE_MAX_BYTES:  # it grew since
        raise ValueError(too_big)
    try:
        return data.decode("utf-8").removesuffix("\n")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{file} is not UTF-8 text: {exc}") from None
