"""Paths a conversion reads and writes: checks before any work, temp names, and moving finished files into place.

Every output is first written under a temp name beside its target, `.<name>.ptqlite-tmp-<pid>`, and renamed
when complete, so a target is either the old file or the new one. Interrupted runs clean up in `finally`;
a run killed outright (SIGKILL, power loss) can leave a temp file, which the next run for the same target
removes once the process named in it is gone.
"""

from __future__ import annotations

import errno
import glob
import os
import re
import shutil
import stat
from collections.abc import Callable
from pathlib import Path

from .errors import OutputError, UsageError

TEMP_TAG = ".ptqlite-tmp-"
_NAME_MAX = 255
_PATH_MAX = 4096


def temp_path(target: Path) -> Path:
    """The temp name this process writes `target` under (in the same folder, so the rename is atomic)."""
    return target.parent / f".{target.name}{TEMP_TAG}{os.getpid()}"


def remove_stale_temps(target: Path) -> None:
    """Remove temp files and folders of `target` left by runs whose process no longer exists."""
    pattern = re.compile(re.escape(f".{target.name}{TEMP_TAG}") + r"(\d+)")
    for leftover in glob.glob(glob.escape(str(target.parent / f".{target.name}{TEMP_TAG}")) + "*"):
        match = pattern.fullmatch(os.path.basename(leftover))
        if match and not _alive(int(match.group(1))):
            remove_quietly(Path(leftover))


def remove_quietly(path: Path) -> None:
    """Delete a file or folder tree if it is there; a failure here must not hide the error being reported."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.lexists(path):
            path.unlink()
    except OSError:
        pass


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but belongs to someone else
        return True
    return True


def is_devnull(text: str) -> bool:
    """True when `text` names the null device (the output is then discarded)."""
    try:
        return bool(text) and os.path.exists(text) and os.path.samefile(text, os.devnull)
    except (OSError, ValueError):
        return False


def path_problem(text: str) -> str | None:
    """What makes `text` unusable as a path whatever the file system holds (None when nothing does)."""
    if not text:
        return "the path is empty"
    if "\0" in text:
        return "the path contains a NUL byte"
    raw = os.fsencode(text)
    if len(raw) >= _PATH_MAX:
        return f"the path is {len(raw)} bytes long; at most {_PATH_MAX - 1} are allowed"
    parts = raw.rstrip(b"/").split(b"/")
    for number, part in enumerate(parts, 1):
        # the last name needs room for the longest temp name written beside it: .<name>.data.ptqlite-tmp-<pid>
        longest = _NAME_MAX - len(TEMP_TAG) - 13 if number == len(parts) else _NAME_MAX
        if len(part) > longest:
            return (f"the name '{os.fsdecode(part[:40])}...' is {len(part)} bytes long; at most {longest} are "
                    "allowed")
    return None


def check_input_file(text: str, flag: str) -> None:
    """Refuse an input that exists but is not a regular file (a FIFO would block reading, a folder fails late).
    A missing file is left to the reader, whose message says which kind of file was expected."""
    try:
        mode = os.stat(text).st_mode
    except (OSError, ValueError):
        return
    if not stat.S_ISREG(mode):
        raise UsageError(f"{flag}={text}: is {_kind(mode)}, not a regular file")


def check_not_special(text: str, flag: str) -> None:
    """Refuse an output path that names a FIFO, device or socket as given (before `.onnx` is appended), rather
    than write a file beside it; /dev/null is handled by the caller (nothing is written)."""
    mode = _mode(Path(text))
    if mode is not None and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise OutputError(f"{flag}={text}: is {_kind(mode)}; expected a file path (or /dev/null to write nothing)")


def check_output_file(path: Path, what: str) -> None:
    """Refuse an output file path that cannot be written, before any work: a folder or special file in its
    place, a regular file where a parent folder should be, a read-only or unwritable folder."""
    text = os.fspath(path)
    problem = path_problem(text)
    if problem:
        raise OutputError(f"{what}={text}: {problem}")
    mode = _mode(path)
    if mode is not None and not stat.S_ISREG(mode):
        raise OutputError(f"{what}={text}: is {_kind(mode)}; expected a file path")
    _check_folder(path.parent, what, text)


def check_output_folder(path: Path, what: str) -> None:
    """The same for a folder that will receive files (debug reports)."""
    text = os.fspath(path)
    problem = path_problem(text)
    if problem:
        raise OutputError(f"{what}={text}: {problem}")
    _check_folder(path, what, text)


def _check_folder(folder: Path, what: str, text: str) -> None:
    existing = Path(os.path.abspath(folder))
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    mode = _mode(existing)
    if mode is None:
        raise OutputError(f"{what}={text}: {existing} cannot be resolved (a symlink loop or a broken link)")
    if not stat.S_ISDIR(mode):
        raise OutputError(f"{what}={text}: {existing} is {_kind(mode)}, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"{what}={text}: cannot write in {existing} ({_why_unwritable(existing)})")


def _why_unwritable(folder: Path) -> str:
    try:
        if os.statvfs(folder).f_flag & os.ST_RDONLY:
            return "read-only file system"
    except OSError:
        pass
    return "permission denied"


def _mode(path: Path) -> int | None:
    try:
        return os.stat(path).st_mode
    except (OSError, ValueError):
        return None


def _kind(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "a file"
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def write_error(target: Path, what: str, exc: OSError) -> OutputError:
    """One sentence for an OSError met while writing `target` (disk full, permission, read-only...)."""
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        reason += "; free some space and run again"
    return OutputError(f"{target}: could not write {what} ({reason})")


def stage_folder(target: Path) -> Path:
    """A fresh temp folder that `target` (a folder) will be moved from by publish_folder. It is made in the
    nearest existing ancestor, so nothing is created at or above `target` until publishing."""
    target = Path(os.path.abspath(target))
    base = target.parent
    while not base.exists() and base != base.parent:
        base = base.parent
    staging = base / f".{target.name or 'output'}{TEMP_TAG}{os.getpid()}"
    remove_stale_temps(base / (target.name or "output"))
    remove_quietly(staging)
    staging.mkdir()
    return staging


def publish_folder(staging: Path, target: Path, replaces: Callable[[str], bool] = lambda name: False) -> None:
    """Move the files of `staging` into `target`: a rename when `target` does not exist yet, else file by file
    (files of `target` that `replaces` accepts and this run did not write are removed first). `staging` is
    gone afterwards, whatever happens."""
    target = Path(os.path.abspath(target))
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            os.replace(staging, target)
            return
        fresh = {p.name for p in staging.iterdir()}
        for old in target.iterdir():
            if old.name not in fresh and replaces(old.name) and old.is_file():
                old.unlink()
        for name in sorted(fresh):
            os.replace(staging / name, target / name)
    finally:
        remove_quietly(staging)
