"""User-facing errors, crash-safe file writing and one-run-at-a-time claims on outputs.
Imports nothing heavy."""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import re
import secrets
import socket
import sys
import tempfile
import time
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


def missing_folders(folder: str | os.PathLike) -> list[Path]:
    """``folder`` and those of its parents that do not exist yet, deepest first: what
    ``mkdir(parents=True)`` is about to create, for ``remove_empty_folders`` to undo."""
    folder = Path(folder).absolute()
    missing = []
    for path in [folder, *folder.parents]:
        if path.exists():
            break
        missing.append(path)
    return missing


def remove_empty_folders(folders: list[Path]) -> None:
    """Remove ``folders`` (deepest first, as ``missing_folders`` lists them) while they are
    empty: a run that wrote nothing leaves no folder it made; one that wrote keeps them."""
    for path in folders:
        try:
            path.rmdir()
        except OSError:  # not empty (or gone): it and its parents stay
            return


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
            if error.filename not in (None, str(tmp)):
                raise
            # Writers such as pyarrow raise OSError without a file name, others name the
            # temporary file the user never asked for: name the target.
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


@contextlib.contextmanager
def atomic_paths(*targets: str | os.PathLike) -> Iterator[list[Path]]:
    """``atomic_path`` for several files that belong together (a model and its tokenizer):
    none of them appears under its name unless every one was written."""
    with contextlib.ExitStack() as stack:
        temporary = [stack.enter_context(atomic_path(target)) for target in targets]
        try:
            yield temporary
        except OSError as error:
            named = {str(tmp): str(target) for tmp, target in zip(temporary, targets, strict=True)}
            if error.filename is not None and str(error.filename) not in named:
                raise
            # The failing file's target; the first one when the error names none.
            target = named.get(str(error.filename), str(targets[0]))
            raise OSError(error.errno, error.strerror or str(error), target) from error


# --------------------------------------------------------------------------- full disks

_DISK_TROUBLE = {
    errno.ENOSPC: ("disk full", "free space or choose {flag} elsewhere"),
    errno.EDQUOT: ("disk quota exceeded", "free space or choose {flag} elsewhere"),
    errno.EROFS: ("read-only file system", "choose {flag} elsewhere"),
}


def disk_trouble(error: BaseException) -> int | None:
    """The errno of a full, over-quota or read-only disk behind ``error``, else None.

    Besides ``OSError``, writers that raise their own error type with the system's code in
    the text count ("... (os error 28)": safetensors; "[errno 28]": pyarrow).
    """
    code = error.errno if isinstance(error, OSError) else None
    if code is None and isinstance(error, Exception):
        found = re.search(r"(?:os error |\[errno )(\d+)", str(error), re.IGNORECASE)
        code = int(found[1]) if found else None
    return code if code in _DISK_TROUBLE else None


@contextlib.contextmanager
def disk_errors(where: str | os.PathLike, flag: str = "--out") -> Iterator[None]:
    """Turn a full, over-quota or read-only disk inside the block into one ``UserError``:
    "disk full writing FILE: free space or choose --out elsewhere" (FILE: the file the error
    names, else ``where``)."""
    try:
        yield
    except UserError:
        raise
    except Exception as error:
        code = disk_trouble(error)
        if code is None:
            raise
        named = getattr(error, "filename", None)
        reason, remedy = _DISK_TROUBLE[code]
        raise UserError(f"{reason} writing {named or where}: {remedy.format(flag=flag)}") from error


# --------------------------------------------------------------------------- claims

LOCK_READ_SECONDS = 1.0
"""How long a lock file just created by another process may stay empty (its owner writes
it right after creating it) before it counts as unreadable."""


def _process_start(pid: int) -> str | None:
    """This boot's id and the start tick of process ``pid`` (Linux), so that a pid reused
    by a later process is not taken for the owner; None where /proc cannot tell."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        stat = Path(f"/proc/{pid}/stat").read_text()
        return f"{boot}:{stat.rsplit(')', 1)[1].split()[19]}"
    except (OSError, IndexError):
        return None


def _owner_alive(owner: dict) -> bool:
    """Whether the process of ``owner`` (a lock of this host) still runs."""
    pid = owner["pid"]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    except (OSError, OverflowError):
        return False
    recorded, now = owner.get("process_start"), _process_start(pid)
    return recorded is None or now is None or recorded == now


def _read_owner(lock: Path, wait: float = LOCK_READ_SECONDS) -> dict | None:
    """The owner recorded in ``lock`` (pid, host, started, token), or None if unreadable."""
    deadline = time.monotonic() + wait
    while True:
        try:
            owner = json.loads(lock.read_text(encoding="utf-8"))
            if (
                isinstance(owner, dict)
                and isinstance(owner.get("pid"), int)
                and owner["pid"] > 0
                and isinstance(owner.get("host"), str)
            ):
                return owner
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            pass
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.05)


def describe_owner(owner: dict) -> str:
    """'pid 123 on host box, since 2025-01-01 10:00:00' for messages."""
    return f"pid {owner['pid']} on host {owner['host']}, since {owner.get('started', '?')}"


def _take_over(lock: Path, stale: dict) -> None:
    """Remove the stale ``lock`` unless another process replaced it meanwhile.

    The file is first renamed to a name of this process (only one of several processes
    taking over can move it), then checked: a fresh claim moved by mistake goes back.
    """
    aside = lock.with_name(f"{lock.name}.stale-{os.getpid()}-{secrets.token_hex(2)}")
    try:
        os.rename(lock, aside)
    except FileNotFoundError:
        return  # another process took it over first
    try:
        if _read_owner(aside, wait=0) != stale:
            with contextlib.suppress(OSError):
                os.link(aside, lock)
    finally:
        aside.unlink(missing_ok=True)


def _refuse(lock: Path, what: str, owner: dict | None) -> UserError:
    if owner is None:
        return UserError(
            f"{what} is claimed by another zmdevice run ({lock} is unreadable); wait for that "
            f"run to end, or delete {lock} if no run uses it"
        )
    if owner["host"] != socket.gethostname():
        return UserError(
            f"{what} is in use by another zmdevice run ({describe_owner(owner)}), which cannot "
            f"be checked from this host: if that run is dead, delete {lock}"
        )
    return UserError(
        f"{what} is in use by another zmdevice run ({describe_owner(owner)}): wait for it to "
        "end, or write elsewhere (another --out)"
    )


@contextlib.contextmanager
def claim(lock: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold ``lock`` for the block, so that one process at a time works on ``what``.

    The lock file is created atomically (``O_CREAT | O_EXCL``) with the owner's pid, host and
    start time, and removed when the block ends, also on an error. A lock left by a process
    of this host that is gone is taken over, with a note on stderr; a lock of another host
    cannot be checked, so it is refused naming the file to delete if that run is dead.

    Args:
        lock: the lock file (its folder must exist).
        what: what the lock protects, for messages ("--out models/x").

    Raises:
        UserError: another live (or uncheckable) run holds it, naming its pid, host and
            start time.
    """
    lock = Path(lock)
    owner = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.datetime.now().astimezone().isoformat(sep=" ", timespec="seconds"),
        "process_start": _process_start(os.getpid()),
        "token": secrets.token_hex(8),
        "what": what,
    }
    for _ in range(5):
        try:
            handle = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            found = _read_owner(lock)
            if found == {}:
                continue  # released meanwhile: try again
            if found is None or found["host"] != owner["host"] or _owner_alive(found):
                raise _refuse(lock, what, found) from None
            _take_over(lock, found)
            print(
                f"note: {what}: taking over the lock of a zmdevice run that is gone "
                f"({describe_owner(found)})",
                file=sys.stderr,
            )
            continue
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as file:
                file.write(json.dumps(owner))
        except BaseException:
            lock.unlink(missing_ok=True)
            raise
        break
    else:
        raise _refuse(lock, what, _read_owner(lock) or None)
    try:
        yield
    finally:
        if _read_owner(lock, wait=0) == owner:
            with contextlib.suppress(OSError):
                lock.unlink()
