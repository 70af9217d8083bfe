"""What a manifest's ``file = "..."`` prompt or prompt-set file may be, and a prompt file's text.

A prompt's text is written into every artefact and sent with the LLM bundles, so a file a
manifest names is checked before it is opened: a regular file under a size cap (1 MiB for one
prompt, more for a prompt set), never under /proc, /sys or /dev, and (unless allowed) inside
the top-level manifest's folder after symlinks.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

PROMPT_FILE_MAX_BYTES = 2**20
SYSTEM_DIRS = (Path("/proc"), Path("/sys"), Path("/dev"))  # refused even when allowed anywhere


def too_big(file: Path, max_bytes: int) -> str:
    return f"{file} is larger than {max_bytes} bytes ({max_bytes / 2**20:g} MiB)"


def checked_file(file: Path, root: Path | None, max_bytes: int, what: str = "prompt") -> Path:
    """``file`` after symlinks, once it passed the checks above; ``root``: the folder it must
    resolve into, or None for anywhere; ``what`` names the file in errors ("prompt": "prompt
    file"). Raises ValueError saying what is wrong."""
    try:
        real = file.resolve()
        st = real.stat() if real.exists() else None
    except (OSError, RuntimeError) as exc:  # a symlink loop, a folder we may not list
        raise ValueError(f"cannot inspect {what} file {file}: {exc}") from None
    as_written = Path(os.path.normpath(file))  # /dev/stdin resolves through /proc/self/fd
    if any(p.is_relative_to(d) for p in (as_written, real) for d in SYSTEM_DIRS):
        raise ValueError(f"{file} is a system file (under /proc, /sys or /dev), not a {what}")
    if st is None:
        raise ValueError(f"{what} file not found: {file}")
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{file} is not a regular file (a directory, FIFO, socket or device)")
    if root is not None and not real.is_relative_to(root):
        shown = str(file) if real == as_written else f"{file} (resolves to {real})"
        raise ValueError(
            f"{shown} is outside the manifest's folder {root}: move it there, "
            "or allow it with --prompt-files-anywhere"
        )
    if st.st_size > max_bytes:
        raise ValueError(too_big(file, max_bytes))
    return real


def read_prompt_file(file: Path, root: Path | None) -> str:
    """The UTF-8 text of ``file`` less one final newline (an editor's); ``root`` as for
    ``checked_file``. Raises ValueError saying what is wrong."""
    real = checked_file(file, root, PROMPT_FILE_MAX_BYTES)
    try:
        with open(real, "rb") as f:
            data = f.read(PROMPT_FILE_MAX_BYTES + 1)
    except OSError as exc:
        raise ValueError(f"cannot read prompt file {file}: {exc.strerror}") from None
    if len(data) > PROMPT_FILE_MAX_BYTES:  # it grew since
        raise ValueError(too_big(file, PROMPT_FILE_MAX_BYTES))
    try:
        return data.decode("utf-8").removesuffix("\n")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{file} is not UTF-8 text: {exc}") from None
