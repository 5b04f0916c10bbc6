"""Shard claims on a shared output folder: one holder at a time, taken over when the holder's process is gone
or its lease was not renewed for the expiry (a worker on another machine), exactly one winner of a takeover."""

import json
import os
import subprocess
import sys
from dataclasses import asdict, replace

from altogether.claims import ShardClaims, Worker
from altogether.io import process_start


def foreign_claim(claims: ShardClaims, shard: str, worker: Worker, renewed_ago: float) -> None:
    """A claim on `shard` held by `worker`, whose lease was last renewed `renewed_ago` seconds ago."""
    lease = claims.root / "workers" / worker.lease
    lease.write_text(json.dumps(asdict(worker)))
    (claims.root / f"{shard}.0").write_text(json.dumps(asdict(worker)))
    when = claims.now() - renewed_ago
    os.utime(lease, (when, when))


def test_a_claim_is_held_once_and_released(tmp_path):
    a, b = ShardClaims(tmp_path, 60), ShardClaims(tmp_path, 60)
    a.start(), b.start()
    assert a.claim("00000", a.holders(), a.now())
    assert not b.claim("00000", b.holders(), b.now())  # a lives: its claim holds
    assert not b.claim("00000", {}, b.now())  # a snapshot that missed the claim still cannot take it
    assert b.claim("00001", b.holders(), b.now())
    a.release("00000")
    assert b.claim("00000", b.holders(), b.now())
    a.stop()
    b.stop()
    assert not (tmp_path / ".claims").exists()  # the last worker leaves nothing


def test_a_worker_on_another_machine_loses_its_claim_after_the_expiry(tmp_path):
    claims = ShardClaims(tmp_path, expiry_s=60)
    claims.start()
    elsewhere = Worker("node7-123-abcd", machine="node7/boot/ns", pid=123, start="42")
    foreign_claim(claims, "00000", elsewhere, renewed_ago=30)
    assert not claims.claim("00000", claims.holders(), claims.now())  # renewed within the expiry
    foreign_claim(claims, "00000", elsewhere, renewed_ago=61)
    assert claims.claim("00000", claims.holders(), claims.now())
    assert sorted(p.name for p in claims.root.iterdir() if p.name != "workers") == ["00000.0", "00000.1"]
    claims.stop()


def test_a_dead_process_on_this_machine_loses_its_claim_at_once(tmp_path):
    claims = ShardClaims(tmp_path, expiry_s=3600)
    claims.start()
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    start = process_start(child.pid)
    child.wait()
    dead = replace(claims.worker, lease=f"here-{child.pid}-dead", pid=child.pid, start=start)
    foreign_claim(claims, "00000", dead, renewed_ago=0)
    reused = replace(claims.worker, lease="here-reused", pid=os.getpid(), start="1")  # this pid, another process
    foreign_claim(claims, "00001", reused, renewed_ago=0)
    alive = replace(claims.worker, lease="here-alive", pid=os.getpid())
    foreign_claim(claims, "00002", alive, renewed_ago=0)
    holders, now = claims.holders(), claims.now()
    assert [claims.claim(s, holders, now) for s in ("00000", "00001", "00002")] == [True, True, False]
    claims.stop()


def test_of_two_workers_taking_over_a_stale_claim_exactly_one_wins(tmp_path):
    a, b = ShardClaims(tmp_path, 60), ShardClaims(tmp_path, 60)
    a.start(), b.start()
    foreign_claim(a, "00000", Worker("gone-1-x", "gone/boot/ns", 1, "1"), renewed_ago=3600)
    holders_a, holders_b = a.holders(), b.holders()  # both judge the claim stale from the same view
    assert [a.claim("00000", holders_a, a.now()), b.claim("00000", holders_b, b.now())] == [True, False]
    a.stop()
    b.stop()
