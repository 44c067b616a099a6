"""Small file helpers shared by every writer and reader of user files (no torch import).

- `atomic_output(path)`: the one way an output (mp4, latents, frames folder, checkpoint) is written:
  into a temporary name unique to this writer (`mkstemp` in the same folder, `.<name>.<random>.partial`),
  renamed onto `path` only when the with-block ends cleanly, removed otherwise. The temporary file is
  locked (flock) while it is written, so a later writer may delete only temporaries whose writer died.
- `append_line(path, line)`: appends one line whole (one `write` under an exclusive lock), starting a
  new line first when the file ends in a line cut short by a crash.
- `no_duplicate_keys`: the `object_pairs_hook` of every JSON reader: a key given twice is an error.
- `free_port()`: a free TCP port on this host for a process group's master.
- `read_regular_file(path, limit)`: the bytes of a file a user names (config, prompts, jobs), refusing
  a FIFO or device (which would block or never end) and a file larger than `limit`.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

TEMP_SUFFIX = ".partial"


class OutputError(OSError):
    """An output that cannot be written (disk full, read-only folder, ...): one line naming the path."""


class DuplicateKeyError(ValueError):
    def __init__(self, key: str):
        super().__init__(f"duplicate key {key!r}")
        self.key = key


def no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    """`json.loads(..., object_pairs_hook=no_duplicate_keys)`: a key given twice raises DuplicateKeyError."""
    result: dict = {}
    for key, value in pairs:
        if key in result:
            raise DuplicateKeyError(key)
        result[key] = value
    return result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_temporary_name(name: str) -> bool:
    """Names of the kind `atomic_output` (or an earlier version of it) uses for unfinished files."""
    return name.startswith(".") and (name.endswith(TEMP_SUFFIX) or ".partial." in name)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def remove_stale_temporaries(path: Path) -> None:
    """Deletes temporaries of `path` left by writers that died (their lock is free); never a live one's."""
    folder = path.parent
    if not folder.is_dir():
        return
    for candidate in folder.glob(f".{path.name}.*{TEMP_SUFFIX}"):
        try:
            fd = os.open(candidate, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # its writer is alive
        else:
            _remove(candidate)
        finally:
            os.close(fd)


def _remove(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:
        pass


@contextmanager
def atomic_output(path: str | os.PathLike, overwrite: bool = False, folder: bool = False) -> Iterator[Path]:
    """Yields a temporary path next to `path` (a file, or a folder with `folder=True`) to write into.

    On a clean exit the temporary is flushed to disk and renamed onto `path`; on any exception
    (KeyboardInterrupt too) it is removed, so a file at `path` is always complete. An existing `path`
    is refused (FileExistsError) unless `overwrite`. Write errors come out as OutputError (one line).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path)
        if folder:
            name = tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
            lock = os.open(name, os.O_RDONLY)
        else:
            lock, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    except OSError as err:
        raise OutputError(f"cannot write {path}: {err.strerror or err}") from None
    temporary = Path(name)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # held until the end: a live writer's temporary is never removed
        try:
            yield temporary
        except BaseException:  # the writer's own error goes on as it is
            _remove(temporary)
            raise
        try:
            _publish(temporary, path, overwrite, folder)
        except (OutputError, FileExistsError):
            raise
        except OSError as err:
            raise OutputError(f"cannot write {path}: {err.strerror or err}") from None
        finally:
            _remove(temporary)
    finally:
        os.close(lock)


def _publish(temporary: Path, path: Path, overwrite: bool, folder: bool) -> None:
    if folder and path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
        path.rmdir()  # an empty folder made beforehand is not an output to keep
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise FileExistsError(f"output {path} appeared while it was written; pass --overwrite to replace it")
        if folder and path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
    if not folder:
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp makes 0600; the finished file gets the usual mode
        fsync(temporary)
    os.replace(temporary, path)
    fsync(path.parent)


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def append_line(path: str | os.PathLike, line: str) -> None:
    """Appends `line` (no newline in it) as one whole line, under an exclusive lock.

    A file that ends without a newline (a crash cut its last line) gets one first, so the new line is
    never glued to the torn one; readers skip the torn line.
    """
    data = (line + "\n").encode()
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OutputError(f"{path} is not a regular file")
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            data = b"\n" + data
        written = os.write(fd, data)
        if written != len(data):
            raise OutputError(f"{path}: only {written} of {len(data)} bytes written")
        os.fsync(fd)
    finally:
        os.close(fd)


class NotRegularFileError(OSError):
    """A file a user names is a FIFO, device, folder, ... or larger than allowed: the message says which."""


def read_regular_file(path: str | os.PathLike, limit: int) -> bytes:
    """The bytes of the regular file at `path`, at most `limit` of them (NotRegularFileError otherwise).

    Opened without blocking, so a FIFO with no writer is refused at once instead of waiting for one."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotRegularFileError(f"{os.fspath(path)} is not a regular file (a FIFO, device or folder)")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise NotRegularFileError(f"{os.fspath(path)} is larger than {limit // 2**20} MiB")
    return data


def holds(folder: str | os.PathLike, path: str | os.PathLike) -> bool:
    """Whether `path` is `folder` or lies inside it (links resolved, case folded as `same_file_key`)."""
    outer, inner = same_file_key(folder), same_file_key(path)
    return inner == outer or inner.startswith(outer.rstrip(os.sep) + os.sep)


NAME_MAX = 255
PATH_MAX = 4096  # Linux's, with the final NUL


def location_problem(path: str | os.PathLike, folder: bool = False) -> str | None:
    """Why an output cannot be written at `path` (a file, or a folder with `folder=True`), found before
    any work starts; None if it can. Writes nothing that stays (a probe file is made and removed)."""
    text = os.fspath(path)
    if "\0" in text:
        return "must not contain a NUL character"
    path = Path(text)
    problem = name_length_problem(text)
    if problem is not None:
        return problem
    try:
        return _location_problem(path, folder)
    except OSError as err:  # e.g. a loop of links, or a name the file system refuses
        return f"cannot be used: {err.strerror or err}"


def name_length_problem(path: str | os.PathLike) -> str | None:
    """Why `path` is longer than a file system allows (a name over NAME_MAX, the whole over PATH_MAX)."""
    text = os.fspath(path)
    too_long = next((part for part in Path(text).parts if len(os.fsencode(part)) > NAME_MAX), None)
    if too_long is not None:
        return f"has a name longer than {NAME_MAX} bytes ({too_long[:20]}...)"
    if len(os.fsencode(os.path.abspath(text))) >= PATH_MAX:
        return f"is longer than the {PATH_MAX - 1} bytes a path may have"
    return None


def _location_problem(path: Path, folder: bool) -> str | None:
    if path.is_dir() and not folder:
        return "is a folder"
    if path.exists() and folder and not path.is_dir():
        return "is not a folder"
    ancestor = path if folder and path.is_dir() else path.parent  # where the first new entry goes
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return f"cannot be made: {ancestor} is not a folder"
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return f"cannot be written: {ancestor} is not writable"
    try:
        fd, probe = tempfile.mkstemp(dir=ancestor, prefix=".probe.", suffix=TEMP_SUFFIX)
    except OSError as err:
        return f"cannot be written: {ancestor}: {err.strerror or err}"
    os.close(fd)
    os.unlink(probe)
    return None


def same_file_key(path: str | os.PathLike) -> str:
    """A key under which two paths that may name one file compare equal: links resolved, case folded
    (a case-insensitive file system, or a folder shared with one, maps `a.mp4` and `a.MP4` to one file)."""
    return str(Path(os.path.abspath(path)).resolve()).casefold()
