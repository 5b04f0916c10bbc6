"""Atomic writes: new files get the umask's permissions, a file replaced in place keeps its own; only stale
temporaries are removed."""

import os
import stat
import time

from altogether.io import atomic_write_text, remove_stale_temporaries, replacing_dir


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
