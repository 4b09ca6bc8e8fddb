"""User-facing errors and crash-safe file writing. Imports nothing heavy."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import tempfile
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class FlagHint:
    """A remedy that needs a flag only some commands have.

    ``with_flag`` is shown where the running command has ``flag``; ``otherwise`` (possibly
    empty) where it does not, so a message never suggests a flag the user cannot pass.
    """

    flag: str
    with_flag: str
    otherwise: str = ""


class UserError(Exception):
    """A mistake in the user's input: the CLI prints the message on one line, exits 2.

    The message names the file, row, column or flag at fault and what to do about it.
    ``hint`` adds a remedy that depends on the command's flags (see :meth:`render`).
    """

    def __init__(self, message: str, *, hint: FlagHint | None = None):
        self.message, self.hint = message, hint
        super().__init__(self.render(None))

    def __str__(self) -> str:
        return self.render(None)

    def __reduce__(self):
        # Rebuilt whole in another process (a DataLoader worker's error), hint included.
        return type(self), (self.message,), {"hint": self.hint}

    def render(self, flags: Collection[str] | None) -> str:
        """The message for a command with ``flags`` (None: any flag may be suggested)."""
        if self.hint is None:
            return self.message
        has_flag = flags is None or self.hint.flag in flags
        remedy = self.hint.with_flag if has_flag else self.hint.otherwise
        return f"{self.message}; {remedy}" if remedy else self.message


def listing(items: Iterable, limit: int = 10, separator: str = ", ") -> str:
    """``items`` joined for one line, the ones past ``limit`` as '... and N more'.

    Class lists run to thousands of names; a message or summary line must stay readable.
    """
    items = [str(item) for item in items]
    shown = separator.join(items[:limit])
    return f"{shown} ... and {len(items) - limit} more" if len(items) > limit else shown


# The extra that provides each optional top-level module (pyproject.toml's extras).
EXTRA_OF_MODULE = {
    **dict.fromkeys(
        (
            "torch",
            "torchvision",
            "transformers",
            "open_clip",
            "timm",
            "safetensors",
            "onnx",
            "onnxscript",
            "matplotlib",
        ),
        "train",
    ),
    **dict.fromkeys(("onnxruntime", "tokenizers"), "runtime"),
}


def missing_dependency(error: ModuleNotFoundError, command: str = "this command") -> UserError:
    """The one-line error for an optional module that is not installed.

    Raises:
        ModuleNotFoundError: ``error`` itself, when the module is not an optional one
            (a broken install or a bug, which deserves its traceback).
    """
    module = (error.name or "").split(".")[0]
    extra = EXTRA_OF_MODULE.get(module)
    if extra is None:
        raise error
    return UserError(
        f"{command} needs the Python package '{module}', which is not installed: "
        f"pip install 'zmdevice[{extra}]'"
    )


_OS_ERROR_REMEDIES = {
    errno.ENOSPC: "free some space or write elsewhere",
    errno.EDQUOT: "free some space or write elsewhere",
    errno.EACCES: "check its permissions or write elsewhere",
    errno.EPERM: "check its permissions or write elsewhere",
    errno.EROFS: "write to a writable place",
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "a part of the path is a file, not a folder; check the path",
    errno.EISDIR: "it is a folder; give a file name",
}


def os_error(error: OSError) -> UserError:
    """One line for a failing environment: the path, the system's reason, a remedy."""
    path = error.filename if error.filename is not None else "a file"
    reason = error.strerror or str(error)
    code = error.errno
    if code is None:  # pyarrow puts the errno in its message only: "... [errno 28] ..."
        found = re.search(r"\[errno (\d+)\]", reason, re.IGNORECASE)
        code = int(found[1]) if found else None
    remedy = _OS_ERROR_REMEDIES.get(code, "check the path and the disk")
    return UserError(f"{path}: {reason}; {remedy}")


def check_writable(
    target: str | os.PathLike, flag: str, *, folder: bool = False, suffix: str = ""
) -> None:
    """Fail now, before any work, if ``target`` (a file, or a folder) cannot be written.

    A missing folder is fine when it can be created; the nearest existing folder above it
    must accept a new file (probed for real: permissions, read-only mounts, a file where a
    folder should be).

    Args:
        target: the output file (or folder, with ``folder``).
        flag: the flag that named it, for the message.
        folder: ``target`` is a folder to create or fill.
        suffix: the file type (".onnx") used in the example of a file path.

    Raises:
        UserError: naming ``flag``, the path and the reason.
    """
    target = Path(target)
    if not folder and target.is_dir():
        raise UserError(
            f"{flag} {target} is a folder: give a file path, e.g. {target / 'NAME'}{suffix}"
        )
    if folder and target.exists() and not target.is_dir():
        raise UserError(f"{flag} {target} is a file: give a folder")
    existing = (target if folder else target.parent).absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(
            f"{flag} {target}: {existing} is a file, not a folder; choose another {flag}"
        )
    try:
        handle, probe = tempfile.mkstemp(prefix=".zmdevice-probe-", dir=existing)
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        raise UserError(
            f"{flag} {target}: cannot write in {existing} ({error.strerror}); "
            f"choose a writable place for {flag}"
        ) from None


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
        try:
            yield tmp
        except OSError as error:
            if error.filename is not None:
                raise
            # Writers such as pyarrow raise OSError without a file name: name the target.
            raise OSError(error.errno, error.strerror or str(error), str(target)) from error
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
