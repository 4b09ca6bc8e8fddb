"""User-facing errors and crash-safe file writing. Imports nothing heavy."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


class UserError(Exception):
    """A mistake in the user's input: the CLI prints the message on one line, exits 2.

    The message names the file, row, column or flag at fault and what to do about it.
    """


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it onto ``target`` on success.

    Whatever is written to the yielded path only appears under the final name once the
    block exits without an exception, so an interrupted or failed write never leaves a
    half-written file behind.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp creates 0600 files; give the result the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomic(target: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``target`` through a temporary file and a rename."""
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
