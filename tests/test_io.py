"""Atomic writes: new files get the umask's permissions, a file replaced in place keeps its own; only stale
temporaries are removed, and a killed folder replacement is undone by the next."""

import os
import socket
import stat
import subprocess
import sys
import time

from altogether.io import atomic_write_text, recover_replaced_dir, remove_stale_temporaries, replacing_dir


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_new_files_follow_the_umask_and_replaced_files_keep_their_mode(tmp_path):
    before = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "new.json", "{}")
        assert mode(tmp_path / "new.json") == 0o644
        shared = tmp_path / "shared.jsonl"
        shared.write_text("old\n")
        shared.chmod(0o664)
        atomic_write_text(shared, "new\n")
        assert shared.read_text() == "new\n" and mode(shared) == 0o664
        with replacing_dir(tmp_path / "export") as tmp:
            (tmp / "a").write_text("a")
        assert mode(tmp_path / "export") == 0o755
        (tmp_path / "export").chmod(0o775)
        with replacing_dir(tmp_path / "export") as tmp:
            (tmp / "a").write_text("b")
        assert mode(tmp_path / "export") == 0o775
    finally:
        os.umask(before)


def test_only_temporaries_older_than_the_limit_are_removed(tmp_path):
    old, fresh = tmp_path / ".summary.json.aaaa.tmp", tmp_path / ".summary.json.bbbb.tmp"
    old.write_text("half")
    fresh.write_text("being written")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    assert remove_stale_temporaries(tmp_path, "summary.json", older_than=time.time() - 600) == [old]
    assert fresh.exists() and not old.exists()


def test_a_killed_folder_replacement_is_undone_or_cleared_by_the_next(tmp_path):
    """Leftovers of replacing_dir calls killed on this machine: the previous version put back when the kill fell
    between the two renames, half-written folders removed; a live writer's folder kept."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    dead, live = f"{socket.gethostname()}-{child.pid}", f"{socket.gethostname()}-{os.getpid()}"
    previous = tmp_path / f".export.old.{dead}.abcd1234" / "export"
    previous.mkdir(parents=True)
    (previous / "model.safetensors").write_text("v1")  # the export, moved aside; the kill came before the swap
    (tmp_path / f".export.{dead}.efgh5678").mkdir()  # the new version, never put in place
    (tmp_path / f".export.{live}.ijkl9012").mkdir()  # a write in progress
    assert not (tmp_path / "export").exists()
    assert len(recover_replaced_dir(tmp_path / "export")) == 2
    assert (tmp_path / "export" / "model.safetensors").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".export.{live}.ijkl9012", "export"]
    with replacing_dir(tmp_path / "export") as tmp:
        (tmp / "model.safetensors").write_text("v2")
    assert (tmp_path / "export" / "model.safetensors").read_text() == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".export.{live}.ijkl9012", "export"]


def test_the_next_write_of_a_file_removes_temporaries_its_dead_writers_left(tmp_path):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    dead = tmp_path / f".out.parquet.{host}-{gone.stdout.strip()}.ab12cd.tmp"  # as a SIGKILLed mix leaves it
    alive = tmp_path / f".out.parquet.{host}-{os.getpid()}.ef34gh.tmp"  # a write still in progress here
    elsewhere = tmp_path / ".out.parquet.other-host-12.ij56kl.tmp"  # a writer this machine cannot see
    other_file = tmp_path / f".summary.json.{host}-{gone.stdout.strip()}.mn78op.tmp"
    for leftover in (dead, alive, elsewhere, other_file):
        leftover.write_text("half")
    atomic_write_text(tmp_path / "out.parquet", "whole")
    assert (tmp_path / "out.parquet").read_text() == "whole"
    assert not dead.exists() and alive.exists() and elsewhere.exists() and other_file.exists()
    assert sorted(p.name for p in tmp_path.glob(".out.parquet.*.tmp")) == sorted([alive.name, elsewhere.name])


def test_a_folder_listed_once_still_gives_each_file_its_dead_writers_temporaries(tmp_path):
    """The folder is listed on this process's first write there; a file written later still gets its own dead
    writers' temporaries removed, and only its own."""
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    later = [tmp_path / f".00001.recaption.parquet.{host}-{gone.stdout.strip()}.ab12cd.tmp",
             tmp_path / f".00001.recaption.parquet.{host}.lan-{gone.stdout.strip()}.ab12cd.tmp"]
    for leftover in later:
        leftover.write_text("half")
    atomic_write_text(tmp_path / "00000.recaption.parquet", "first")
    assert all(leftover.exists() for leftover in later)
    atomic_write_text(tmp_path / "00001.recaption.parquet", "second")
    assert not later[0].exists() and later[1].exists()  # host "<host>.lan" is another machine
    assert sorted(p.name for p in tmp_path.iterdir()) == [later[1].name, "00000.recaption.parquet",
                                                          "00001.recaption.parquet"]
