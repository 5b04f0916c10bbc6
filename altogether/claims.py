"""Shard claims: independent workers writing one output folder share its shards without doing one twice.

Each worker process holds a *lease*, ``<folder>/.claims/workers/<id>``, whose modification time a background
thread renews every ``expiry_s / 10`` seconds. A claim on shard ``S`` is the file ``<folder>/.claims/S.<n>``
naming its worker's lease; the claim with the highest generation ``n`` is the shard's. A claim is made by
hard-linking a fully written temporary file to that name (``link`` fails when the name exists: atomic on a
local filesystem and on NFS, the classic NFS-safe lock, and a reader never sees a half-written claim; where
a filesystem has no hard links, an exclusive create).

A claim is *stale*, and may be taken over, when its worker is gone:

- its lease file was removed (the worker ended) or not renewed for ``expiry_s``. Times are the filesystem's:
  the lease's modification time against that of our own lease just renewed, so the machines' clocks need
  not agree (an NFS client sets a touched file's time from the server's clock). ``expiry_s`` must exceed
  the renewal interval plus the attribute-cache time of an NFS mount (``acregmax``, 60 s by default);
- or it ran on this machine (same host name, boot and process namespace) and its process no longer
  exists, which needs no waiting.

Taking over creates generation ``n + 1`` the same way, so of two workers that find a claim stale exactly one
gets the shard. A worker judged dead while it was only stalled may still finish its shard: the outputs are
written atomically and deterministically, so the cost is the duplicated work, never a damaged file.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

from .io import atomic_write_text, process_start

log = logging.getLogger(__name__)

CLAIMS_DIR = ".claims"  # under the output folder


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def machine_id() -> str:
    """This machine as seen by process ids: host name, boot id and pid namespace (containers on one host
    share the host name but not their process ids)."""
    boot = _read(Path("/proc/sys/kernel/random/boot_id")) or ""
    try:
        namespace = str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        namespace = ""
    return f"{socket.gethostname()}/{boot}/{namespace}"


@dataclass(frozen=True)
class Worker:
    """Who holds a claim: its lease file name, machine and process."""

    lease: str
    machine: str
    pid: int
    start: str | None

    @classmethod
    def this_process(cls) -> Worker:
        pid = os.getpid()
        return cls(f"{socket.gethostname()}-{pid}-{secrets.token_hex(4)}", machine_id(), pid, process_start(pid))


class ShardClaims:
    """This process's lease on ``folder`` and its claims on shards there (see the module docstring).

    :meth:`start` creates the lease and starts renewing it; :meth:`stop` releases every claim of this lease and
    removes it. The object can be sent to data-loader worker processes: their claims are made for the lease of
    the process that started it (which renews it and outlives them).
    """

    def __init__(self, folder: str | Path, expiry_s: float):
        if expiry_s <= 0:
            raise ValueError(f"claim expiry must be > 0 seconds, got {expiry_s}")
        self.root = Path(folder) / CLAIMS_DIR
        self.expiry_s = expiry_s
        self.worker = Worker.this_process()
        self._stop: threading.Event | None = None

    @property
    def lease(self) -> Path:
        return self.root / "workers" / self.worker.lease

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_stop": None}  # the renewing thread stays with the lease holder

    def start(self) -> float:
        """Create the lease and renew it in a daemon thread; returns the filesystem's time now."""
        for attempt in range(3):  # a worker that ends removes the folders when empty, maybe between the two
            try:
                self.lease.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(self.lease, json.dumps(asdict(self.worker)) + "\n")
                break
            except FileNotFoundError:
                if attempt == 2:
                    raise
        self._stop = threading.Event()
        threading.Thread(target=self._renew, args=(self._stop,), name="shard-claims-lease", daemon=True).start()
        return self.now()

    def _renew(self, stop: threading.Event) -> None:
        while not stop.wait(self.expiry_s / 10):
            try:
                os.utime(self.lease)
            except OSError as err:  # a filesystem hiccup: the next renewal may work; the claims expire if not
                log.warning("could not renew the shard-claim lease %s: %s", self.lease, err)

    def stop(self) -> None:
        """Stop renewing; release this lease's claims and those of dead workers; remove this lease and dead
        workers' leases (a claim whose lease is gone is stale anyway)."""
        if self._stop is not None:
            self._stop.set()
            self._stop = None
        now = self.now()
        for path in self._claim_files():
            if self._holder(path) == self.worker.lease or self.is_stale(path, now):
                path.unlink(missing_ok=True)
        for lease in self.lease.parent.iterdir():
            if lease != self.lease and self._dead(lease, now):
                lease.unlink(missing_ok=True)
        self.lease.unlink(missing_ok=True)
        for folder in (self.lease.parent, self.root):  # the last worker leaves no trace
            try:
                folder.rmdir()
            except OSError:  # another worker's lease or claims are still there
                break

    def others_alive(self, now: float) -> bool:
        """Whether a worker other than this one still holds a live lease on the folder; ``now`` from :meth:`now`."""
        leases = self.lease.parent
        others = [p for p in leases.iterdir() if p != self.lease and not p.name.startswith(".")] if (
            leases.is_dir()) else []
        return any(not self._dead(lease, now) for lease in others)

    def now(self) -> float:
        """The filesystem's clock: renew our lease and read back its modification time."""
        os.utime(self.lease)
        return self.lease.stat().st_mtime

    # ------------------------------------------------------------------------------------------ claims

    def _claim_files(self) -> list[Path]:
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return []
        return [self.root / n for n in names if not n.startswith(".") and n.rpartition(".")[2].isdigit()]

    def holders(self) -> dict[str, tuple[int, Path]]:
        """Every claimed shard: its highest generation and that claim's file."""
        current: dict[str, tuple[int, Path]] = {}
        for path in self._claim_files():
            shard, _, generation = path.name.rpartition(".")
            if int(generation) >= current.get(shard, (-1, path))[0]:
                current[shard] = (int(generation), path)
        return current

    def _holder(self, path: Path) -> str | None:
        text = _read(path)
        try:
            return json.loads(text)["lease"] if text else None
        except (ValueError, KeyError, TypeError):
            return None

    def is_stale(self, claim: Path, now: float) -> bool:
        """Whether the worker holding ``claim`` is gone (see the module docstring); ``now`` from :meth:`now`."""
        return self._dead(claim, now, lease=False)

    def _dead(self, path: Path, now: float, lease: bool = True) -> bool:
        """Whether the worker named in ``path`` (a claim, or with ``lease`` its lease file) is gone."""
        text = _read(path)
        if text is None:
            return False  # removed meanwhile: the shard was finished or released, the caller looks again
        try:
            holder = Worker(**json.loads(text))
        except (ValueError, TypeError):  # being written (an exclusive create), or not written by this code
            try:
                return now - path.stat().st_mtime > self.expiry_s
            except FileNotFoundError:
                return False
        if holder.machine == self.worker.machine and process_start(holder.pid) not in (holder.start, "?"):
            return True
        try:
            renewed = (path if lease else self.root / "workers" / holder.lease).stat().st_mtime
        except FileNotFoundError:
            return True
        return now - renewed > self.expiry_s

    def claim(self, shard: str, holders: dict[str, tuple[int, Path]], now: float) -> bool:
        """Claim ``shard`` if it is free or its claim in ``holders`` (from :meth:`holders`) is stale; ``False``
        when a live worker holds it or another worker claimed it first."""
        generation, held = holders.get(shard, (-1, None))
        if held is not None and not self.is_stale(held, now):
            return False
        target = self.root / f"{shard}.{generation + 1}"
        content = (json.dumps(asdict(self.worker)) + "\n").encode()
        tmp = self.root / f".{target.name}.{self.worker.lease}"
        tmp.write_bytes(content)
        try:
            os.link(tmp, target)
        except FileExistsError:
            # On NFS a retried link whose first reply was lost reports EEXIST although it worked: then the
            # temporary file has a second name.
            if tmp.stat().st_nlink != 2:
                return False
        except OSError:  # a filesystem without hard links (some FUSE and object-store mounts): exclusive create
            try:
                fd = os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(content)
        finally:
            tmp.unlink(missing_ok=True)
        return True

    def release(self, shard: str) -> None:
        """Remove every claim on ``shard`` (its output is written, or this worker gives it up)."""
        for path in self._claim_files():
            if path.name.rpartition(".")[0] == shard:
                path.unlink(missing_ok=True)
