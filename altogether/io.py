"""Writing files so that a reader never sees a half-written one: write beside the target, then rename."""

from __future__ import annotations

import glob
import os
import re
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Iterator


def jsonl_lines(path: str | Path) -> Iterator[tuple[int, Any, str | None]]:
    """``(line number from 1, value, problem)`` for every non-blank line of a JSONL file.

    A line that is not valid UTF-8 JSON gives ``value=None`` and a ``problem`` naming the error; callers decide
    whether that stops the read or skips the line. Opening or reading the file raises as usual.
    """
    import json

    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield number, None, f"not UTF-8 text (byte 0x{raw[err.start]:02x} at column {err.start + 1})"
                continue
            if not line.strip():
                continue
            try:
                yield number, json.loads(line), None
            except json.JSONDecodeError as err:
                yield number, None, f"not valid JSON ({err.msg} at column {err.colno})"


def _new_modes(folder: Path) -> None:
    """Give every file and folder under ``folder`` the permissions a new one gets (0666 / 0777 less the umask).

    Writers that are not ours decide otherwise: safetensors' ``save_file`` renames a private (0600) temporary
    file into place, and ``shutil.copy2`` copies its source's mode. Symbolic links are left as they are.
    """
    mask = _umask()
    for root, folders, files in os.walk(folder):
        for name, mode in [*((n, 0o777) for n in folders), *((n, 0o666) for n in files)]:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, mode & ~mask)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _mode_for(path: Path, new: int) -> int:
    """The permission bits for what replaces ``path``: those ``path`` has if it exists (a shared 0664 file stays
    shared), else ``new`` less the umask (as ``open`` and ``mkdir`` would give)."""
    try:
        return path.stat().st_mode & 0o7777
    except FileNotFoundError:
        return new & ~_umask()


@contextmanager
def atomic_open(path: str | Path) -> Iterator[BinaryIO]:
    """A binary file that appears at ``path`` whole or not at all: written as ``.NAME.XXXX.tmp`` in the same
    folder (the same filesystem, so the rename is atomic), flushed to disk, then renamed over ``path``.

    An error removes the temporary file; a kill leaves it. The temporary's name holds its writer
    (``.NAME.<host>-<pid>.XXXX.tmp``), so the next write of ``path`` removes those of writers on this machine that
    are gone, whatever command left them (:func:`sweep_dead_temporaries`); :func:`remove_stale_temporaries` clears
    others by age. A new file gets the usual permissions (0666 less the umask), not the private 0600 of a temporary
    file; a file replaced keeps its permissions.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_dead_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_writer_tag()}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _mode_for(path, 0o666))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# folder -> target name -> temporaries its dead writers left there, from this process's one listing of the folder
_DEAD_TEMPORARIES: dict[str, dict[str, list[str]]] = {}


def sweep_dead_temporaries(path: Path) -> None:
    """Remove the temporaries of ``path`` (``.NAME.<host>-<pid>.XXXX.tmp``) whose writers on this machine are gone.

    The folder is listed once per process, on its first write there, and what dead writers left is kept by
    target until that target is written: listing a folder of 20,000 files on every write cost about 20 ms a
    write (``benchmarks/bench_atomic_write.py``). A writer that dies after that listing leaves its temporary to
    the next process that writes the file (or to :func:`remove_stale_temporaries`).
    """
    folder = os.path.abspath(path.parent)
    dead = _DEAD_TEMPORARIES.get(folder)
    if dead is None:
        dead = _DEAD_TEMPORARIES[folder] = {}
        # Only this machine's writers can be told dead; a host name and a target name may both hold dots
        leftover = re.compile(rf"\.(.+)\.({re.escape(socket.gethostname())}-\d+)\.[^.]+\.tmp")
        with os.scandir(folder) as entries:
            for entry in entries:
                found = leftover.fullmatch(entry.name)
                if found and _dead_writer(found[2]):
                    dead.setdefault(found[1], []).append(entry.path)
    for name in dead.pop(path.name, ()):
        Path(name).unlink(missing_ok=True)


def remove_stale_temporaries(folder: str | Path, name_glob: str = "*", older_than: float | None = None
                             ) -> list[Path]:
    """Remove the temporary files :func:`atomic_open` left in ``folder`` when a process was killed mid-write
    (for targets matching ``name_glob``); returns them.

    ``older_than``: a modification time (the filesystem's clock, seconds since the epoch); only files last
    written before it are removed, so that a write in progress in another process is left alone.
    """
    stale = []
    for path in sorted(Path(folder).glob(f".{name_glob}.*.tmp")) if Path(folder).is_dir() else []:
        try:
            if older_than is None or path.stat().st_mtime < older_than:
                path.unlink()
                stale.append(path)
        except FileNotFoundError:  # finished or removed by its writer meanwhile
            continue
    return stale


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` with :func:`atomic_open`."""
    with atomic_open(path) as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Text version of :func:`atomic_write_bytes` (UTF-8)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def process_start(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, ``/proc/<pid>/stat`` field 22), or ``None`` if it
    does not exist or is a zombie; ``"?"`` where ``/proc`` cannot tell. Together with the pid this names one
    process even after its pid is reused."""
    if not Path("/proc/self/stat").exists():  # no procfs: only whether the pid exists
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return "?"
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # the command name in parentheses may hold spaces
    return None if fields[0] == "Z" else fields[19]


def _writer_tag() -> str:
    """``<host>-<pid>``, put in the names of temporary folders so a later run can tell a dead writer's."""
    return f"{socket.gethostname()}-{os.getpid()}"


def _dead_writer(tag: str) -> bool:
    """Whether the process named by a :func:`_writer_tag` is gone; ``False`` when that cannot be told here (a
    writer on another machine, or a name without a tag)."""
    host, _, pid = tag.rpartition("-")
    return host == socket.gethostname() and pid.isdigit() and process_start(int(pid)) is None


def recover_replaced_dir(target: str | Path) -> list[Path]:
    """Clear what :func:`replacing_dir` calls on ``target`` killed on this machine left beside it; returns the
    folders removed.

    A kill between its two renames leaves ``target`` missing and the previous version in ``.NAME.old.TAG.X``:
    that version is put back (the write did not happen, all or nothing). Leftovers of live writers and of
    writers on other machines are kept.
    """
    target = Path(target)
    removed = []
    for leftover in sorted(target.parent.glob(f".{glob.escape(target.name)}.*")):
        rest = leftover.name[len(target.name) + 2 :]
        previous = rest.startswith("old.")
        tag = (rest[4:] if previous else rest).rpartition(".")[0]  # mkdtemp's random part holds no dot
        if not leftover.is_dir() or not _dead_writer(tag):
            continue
        if previous and not target.exists() and (leftover / target.name).exists():
            os.replace(leftover / target.name, target)
        shutil.rmtree(leftover, ignore_errors=True)
        removed.append(leftover)
    return removed


@contextmanager
def replacing_dir(target: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``target``; on success it replaces ``target`` whole.

    On an error the temporary folder is removed and ``target`` is left as it was; what a killed call left is
    cleared by the next one (:func:`recover_replaced_dir`). The folder gets the permissions ``target`` had, or
    0777 less the umask for a new one; everything in it is new, so gets 0666 / 0777 less the umask whatever wrote
    it (:func:`_new_modes`).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_replaced_dir(target)
    tag = _writer_tag()
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.{tag}.", dir=target.parent))
    try:
        tmp.chmod(_mode_for(target, 0o777))  # mkdtemp makes it private; what we write is meant to be shared
        yield tmp
        _new_modes(tmp)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.{tag}.", dir=target.parent))
            os.replace(target, old / target.name)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
