"""Robustness probe (issue 18): a cluster user's faults played against the library's real commands.

Two kinds of case, each run as the command a user types (``python -m altogether.train``, ``.recaption``, ``.mix``,
``.annotate``, ``.evaluate``, ``.hub``, or a short ``Recaptioner`` script) in its own process, on a tiny model and
data built with :mod:`altogether.tiny`:

* **faults**: SIGKILL and SIGTERM at chosen moments (during a shard, a checkpoint write, the export, the summary,
  mix's output, annotate's per-vendor files) and at seeded random moments (uniform over a clean run's
  duration). A fault *survived* when every invariant of issue 18 §2 held: no good file replaced by a half-written
  one, SIGTERM gives exit 143 with the checkpoint / summary written (or a finished run), the rerun (training:
  ``resume=auto``, or ``resume=true`` on versions without ``auto``, when a checkpoint exists) exits 0, leaves no
  temporaries, and ends as a clean run does (recaption and mix: byte-identical outputs; training: the same
  export weights, atol 1e-6; annotate: the same files).
* **inputs**: the bad inputs and user mistakes of issue 18 §1, §4 and §5 and their kin. *Handled* when the
  outcome is the expected one: the sample (or shard) skipped and counted, or one line ``error: ...`` naming the
  key or file with exit 2, or, for files and paths users are entitled to, the command succeeding with the right
  result. *Traceback* when stderr holds ``Traceback (most recent call last)``.

Commands run in processes forked from one that has already imported torch, Lightning, transformers and
open_clip (a zygote), so a case costs its work and not 15 s of imports; each child runs the command's module as
``__main__`` exactly as ``python -m`` does, in its own process group, with a 6 GiB address-space limit (as a
cluster job's memory limit) and ``TMPDIR`` on tmpfs (``/dev/shm``) when the runs are on another filesystem, as
on a cluster node. Chosen moments are set by a trap installed in the child before the command starts
(a kill when a named file is written or renamed into place: the first half of the bytes written, then the
signal); random moments by a timer. Seeded, so reruns give the same cases.

The command grammar changed between versions (``mix`` and ``annotate`` took ``--flags`` before ``key=value``;
``resume=auto`` is new): each case is spelled as the version under test's user would spell it, the version
detected from its ``mix --help``.

    uv run python benchmarks/probe_robustness.py                          # this checkout
    uv run python benchmarks/probe_robustness.py --checkout /tmp/before18 # another checkout (its .venv)
    uv run python benchmarks/probe_robustness.py --only inputs --json out.json

Prints one line per case (case, expected, got, verdict) and the totals: faults survived / tried, inputs handled /
tried, tracebacks.
"""

from __future__ import annotations

import argparse
import fnmatch
import io
import json
import os
import random
import resource
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

TRACEBACK = "Traceback (most recent call last)"
MEMORY_LIMIT = 6 << 30  # bytes of address space a command may use (a cluster job's limit)
THIN_PEAK_LIMIT = 1.5 * (1 << 30)  # a thin image may not take a run's peak memory above this (bytes)
ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
SEED = 18


# ============================================================================================ the world
# Built by this checkout's altogether.tiny (in its own process), read as plain files by the version under test.


def build_world(root: Path) -> None:
    """Tiny CLIP and tokenizer, drawn training/validation JSONL, 3 webdataset shards of 5, a manifest, an
    Altogether-FT file; ``root/world.json`` lists them."""
    from PIL import Image

    from altogether.tiny import (COLOURS, SHAPES, draw_shape, tiny_model_overrides, web_images, write_altogether_ft,
                                 write_tiny_clip, write_tokenizer)

    words = [f"a {c} {s} on a white background" for c in COLOURS for s in SHAPES] + [
        "photo of the product zorbit K-12 for sale", "IMG_2231.jpg shop price 12.99 cheap", "a photo of"]
    clip = write_tiny_clip(root / "clip", seed=0)
    tok = write_tokenizer(root / "tok", words * 5, vocab_size=400)
    (root / "images").mkdir()
    rows = []
    for i in range(24):
        colour, shape = list(COLOURS)[i % 4], SHAPES[(i // 4) % 2]
        draw_shape(colour, shape, seed=i).save(root / "images" / f"{i:03d}.png")
        rows.append({"key": f"r{i:03d}", "img_path": f"images/{i:03d}.png", "alt": f"zorbit K-{i} for sale",
                     "round3": f"a photo of zorbit K-{i}: a {colour} {shape} on a white background"})
    write_jsonl(root / "train.jsonl", rows)
    write_jsonl(root / "val.jsonl", rows[:3])
    write_jsonl(root / "manifest.jsonl", [{k: r[k] for k in ("key", "img_path", "alt")} for r in rows[:6]])
    (root / "shards").mkdir()
    for s in range(3):
        write_tar(root / "shards" / f"{s:05d}.tar", [
            (f"s{s}-{j:03d}", {"png": (root / "images" / f"{5 * s + j:03d}.png").read_bytes(),
                               "json": json.dumps({"caption": f"zorbit K-{5 * s + j} for sale"}).encode()})
            for j in range(5)])
    write_altogether_ft(root / "ft.json", web_images(4), root / "ft_images")
    assert Image.open(root / "images" / "000.png").size[0] > 0
    (root / "world.json").write_text(json.dumps({"clip": str(clip), "tok": str(tok),
                                                 "overrides": tiny_model_overrides(clip, tok)}))


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    """A webdataset shard of ``(key, {ext: bytes})`` samples (here, not imported: cases are built under the
    checkout under test, which may predate any shared helper)."""
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def png_bytes(width: int, height: int) -> bytes:
    """A white greyscale PNG of ``width`` x ``height`` pixels written by hand (zlib compresses it to a few bytes
    per thousand rows: the "thin" images of issue 18 §1)."""
    raw = (b"\x00" + b"\xff" * width) * height
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` but holds one row of data (a decompression bomb's
    header on a tiny file)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" + b"\xff" * 3 * min(width, 64))) + chunk(b"IEND", b""))


# ============================================================================================ the zygote


PRELOAD = ["torch", "lightning.pytorch", "transformers", "transformers.models.opt.modeling_opt", "open_clip",
           "pyarrow.parquet", "PIL.Image", "omegaconf", "safetensors.torch", "webdataset", "altogether.config",
           "altogether.model", "altogether.training", "altogether.recaptioner", "altogether.export",
           "altogether.data.datamodule", "altogether.cli"]


def preload() -> None:
    import importlib
    import warnings

    warnings.filterwarnings("ignore")
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:
            pass


@dataclass
class Trap:
    """Send ``sig`` to the command itself when it writes (``on="write"``: after the first half of the bytes of a
    write) or renames into place (``on="rename"``: before the rename) a file whose name matches ``match``, the
    ``nth`` time (1-based); later matches pass."""

    on: str
    match: str
    sig: int = signal.SIGKILL
    nth: int = 1


def _install_trap(trap: Trap) -> None:
    import builtins

    seen, inside = [0], [False]  # inside: a trapped writer calling another (a copy opening its target)

    def hit(name: str) -> bool:
        if inside[0] or not fnmatch.fnmatch(os.path.basename(str(name)), trap.match):
            return False
        seen[0] += 1
        return seen[0] == trap.nth

    def fire() -> None:
        Path(os.environ["PROBE_LOGS"], "fired").touch()  # the fault was played
        sys.stdout.flush()
        os.kill(os.getpid(), trap.sig)
        if trap.sig == signal.SIGKILL:
            time.sleep(60)

    if trap.on == "rename":
        for mod, attr in ((os, "replace"), (os, "rename"), (shutil, "move")):
            real = getattr(mod, attr)

            def moved(src, dst, *a, _real=real, **k):
                if hit(dst):
                    fire()
                return _real(src, dst, *a, **k)
            setattr(mod, attr, moved)
        return

    class Half(io.BufferedIOBase):  # a file whose first write puts down half its bytes, then the signal
        def __init__(self, f):
            self.f, self.fired = f, False

        for _name in ("fileno", "flush", "close", "writable", "readable", "seekable", "tell", "seek", "truncate",
                      "read", "readline", "isatty"):
            locals()[_name] = (lambda n: lambda self, *a, **k: getattr(self.f, n)(*a, **k))(_name)

        @property
        def closed(self):
            return self.f.closed

        @property
        def name(self):
            return self.f.name

        @property
        def mode(self):
            return self.f.mode

        def write(self, data):
            if self.fired:
                return self.f.write(data)
            self.fired = True
            view = data if isinstance(data, str) else memoryview(data).cast("B")
            half = max(1, len(view) // 2)
            self.f.write(view[:half])
            self.f.flush()
            fire()
            self.f.write(view[half:])
            return len(view)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __iter__(self):
            return iter(self.f)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

    real_open = builtins.open

    def name_of(file) -> str:
        if isinstance(file, int):
            try:
                return os.readlink(f"/proc/self/fd/{file}")
            except OSError:
                return ""
        return os.fspath(file) if isinstance(file, (str, bytes, os.PathLike)) else ""

    def opened(file, mode="r", *a, **k):
        f = real_open(file, mode, *a, **k)
        if any(c in mode for c in "wax+") and hit(name_of(file)):
            return Half(f)
        return f
    builtins.open = io.open = opened

    # Writers that do not go through Python's open (C++ / Rust): the whole file, then cut to half, then the signal
    def cut(real, path_arg):
        def wrapped(*a, **k):
            path = a[path_arg] if len(a) > path_arg else next(iter(k.values()), None)
            inside[0] = True
            try:
                out = real(*a, **k)
            finally:
                inside[0] = False
            if isinstance(path, (str, os.PathLike)) and hit(path):
                size = os.path.getsize(path)
                os.truncate(path, size // 2)
                fire()
            return out
        return wrapped
    targets = []
    try:
        import safetensors.torch as st
        targets.append((st, "save_file", 1))
    except ImportError:
        pass
    try:
        import pyarrow.parquet as pq
        targets.append((pq, "write_table", 1))
    except ImportError:
        pass
    import torch
    targets.append((torch, "save", 1))
    real_copyfile = shutil.copyfile

    def copied(src, dst, *a, **k):  # a copy (shutil.move across filesystems): half the bytes, then the signal
        if hit(dst):
            with real_open(src, "rb") as f, real_open(dst, "wb") as g:
                data = f.read()
                g.write(data[: len(data) // 2])
            fire()
        inside[0] = True
        try:
            return real_copyfile(src, dst, *a, **k)
        finally:
            inside[0] = False
    targets.append((shutil, "copyfile", None))
    for mod, attr, arg in targets:
        real = getattr(mod, attr)
        patched = copied if attr == "copyfile" else cut(real, arg)
        for other in list(sys.modules.values()):  # names bound by `from x import y [as z]` too
            try:
                for name, value in list(vars(other).items()):
                    if value is real:
                        setattr(other, name, patched)
            except Exception:
                pass
        setattr(mod, attr, patched)


@dataclass
class Result:
    rc: int
    stdout: str
    stderr: str
    seconds: float
    peak_rss: int  # bytes
    signal: int = 0  # the signal that ended the process (it did not exit by itself), else 0
    played: bool = True  # False: the run had a trap and never reached it


class Runner:
    """Forks commands from this (preloaded) process."""

    def __init__(self, work: Path):
        self.work = work
        self.count = 0

    def start(self, module: str | None, argv: list[str], *, code: str | None = None, cwd: Path | None = None,
              trap: Trap | None = None, umask: int = 0o022) -> tuple[int, Path]:
        self.count += 1
        logs = self.work / "logs" / f"{self.count:04d}"
        logs.mkdir(parents=True)
        (logs / "argv").write_text(json.dumps({"module": module, "argv": argv, "cwd": str(cwd or self.work),
                                               "trap": trap.__dict__ if trap else None}))
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the command
            code_ = 1
            try:
                os.setpgid(0, 0)
                out = os.open(logs / "stdout", os.O_WRONLY | os.O_CREAT, 0o644)
                err = os.open(logs / "stderr", os.O_WRONLY | os.O_CREAT, 0o644)
                os.dup2(out, 1)
                os.dup2(err, 2)
                os.umask(umask)
                os.chdir(cwd or self.work)
                os.environ["PROBE_LOGS"] = str(logs)
                resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
                for sig in (signal.SIGTERM, signal.SIGINT):
                    signal.signal(sig, signal.SIG_DFL)
                if trap is not None:
                    _install_trap(trap)
                import runpy
                if code is not None:
                    sys.argv = ["-c", *argv]
                    exec(compile(code, "<probe>", "exec"), {"__name__": "__main__"})
                else:
                    sys.argv = [module, *argv]
                    runpy.run_module(module, run_name="__main__", alter_sys=True)
                code_ = 0
            except SystemExit as done:
                if done.code is None:
                    code_ = 0
                elif isinstance(done.code, int):
                    code_ = done.code
                else:
                    print(done.code, file=sys.stderr)
                    code_ = 1
            except BaseException:
                traceback.print_exc()
                code_ = 1
            finally:
                try:
                    sys.stdout.flush()
                    sys.stderr.flush()
                finally:
                    os._exit(code_)
        return pid, logs

    def wait(self, pid: int, logs: Path, started: float, timeout: float = 600) -> Result:
        deadline = time.monotonic() + timeout
        while True:
            done, status, usage = os.wait4(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.killpg(pid, signal.SIGKILL)
            time.sleep(0.02)
        return self._result(pid, status, usage, logs, started)

    def _result(self, pid, status, usage, logs: Path, started: float) -> Result:
        self._reap_group(pid)
        rc = os.waitstatus_to_exitcode(status)
        trapped = json.loads((logs / "argv").read_text())["trap"] is not None
        return Result(128 - rc if rc < 0 else rc,  # killed by a signal: the shell's 128 + N
                      (logs / "stdout").read_text(errors="replace"), (logs / "stderr").read_text(errors="replace"),
                      time.monotonic() - started, usage.ru_maxrss * 1024, -rc if rc < 0 else 0,
                      not trapped or (logs / "fired").exists())

    @staticmethod
    def _reap_group(pid: int) -> None:
        try:
            os.killpg(pid, signal.SIGKILL)  # data-loader workers or a dead command's helpers
        except ProcessLookupError:
            pass

    def run(self, module: str | None, argv: list[str], **kw) -> Result:
        timeout = kw.pop("timeout", 600)
        started = time.monotonic()
        pid, logs = self.start(module, argv, **kw)
        return self.wait(pid, logs, started, timeout)

    def run_until(self, module: str | None, argv: list[str], when: Callable[[float], bool], sig: int,
                  **kw) -> Result:
        """Run, send ``sig`` to the command's process group the first time ``when(seconds since start)``."""
        started = time.monotonic()
        pid, logs = self.start(module, argv, **kw)
        sent = False
        while True:
            done, status, usage = os.wait4(pid, os.WNOHANG)
            if done:
                break
            if not sent and when(time.monotonic() - started):
                os.killpg(pid, sig) if sig == signal.SIGKILL else os.kill(pid, sig)
                sent = True
            if time.monotonic() - started > 600:
                os.killpg(pid, signal.SIGKILL)
            time.sleep(0.005)
        return self._result(pid, status, usage, logs, started)


# ============================================================================================ the version


@dataclass
class Version:
    flags: bool  # mix / annotate take --flags (older grammar)
    resume_auto: bool  # resume=auto exists

    def mix(self, inputs: list[str], **settings: Any) -> tuple[str, list[str]]:
        return "altogether.mix", [*inputs, *self.settings(settings)]

    def annotate(self, action: str, positional: list[str], **settings: Any) -> tuple[str, list[str]]:
        if not self.flags:
            return "altogether.annotate", [action, *positional, *self.settings(settings)]
        return "altogether.annotate", [action, *self.settings(settings), *positional]

    def settings(self, settings: dict[str, Any]) -> list[str]:
        """``key=value`` arguments, or the older ``--key value`` / ``--flag`` ones."""
        if not self.flags:
            return [f"{k}={_typed(v)}" for k, v in settings.items()]
        args = []
        for k, v in settings.items():
            flag = "--" + k.replace("_", "-")
            if v is True:
                args.append(flag)
            elif v is not False and v is not None:
                args += [flag, str(v)]
        return args

    def resume(self, run: Path) -> list[str]:
        if self.resume_auto:
            return ["resume=auto"]
        has = any((run / "checkpoints").glob("*.ckpt")) if (run / "checkpoints").is_dir() else False
        return ["resume=true"] if has else []


def _typed(v: Any) -> str:
    return str(v).lower() if isinstance(v, bool) else ("null" if v is None else str(v))


def detect_version(runner: Runner) -> Version:
    mix = runner.run("altogether.mix", ["--help"])
    import altogether.training as training
    return Version(flags="--out" in mix.stdout, resume_auto="resume=auto" in Path(training.__file__).read_text())


# ============================================================================================ the probe


@dataclass
class Case:
    kind: str  # "fault" or "input"
    name: str
    expected: str
    got: str = ""
    ok: bool = False
    traceback: bool = False
    note: str = ""
    played: bool = True  # a fault whose moment never came (the write it waits for did not happen)


class Probe:
    def __init__(self, world: Path, work: Path, version: Version, runner: Runner):
        self.world, self.work, self.v, self.r = world, work, version, runner
        meta = json.loads((world / "world.json").read_text())
        self.model = self._flat("", meta["overrides"])
        self.cases: list[Case] = []
        self.rng = random.Random(SEED)

    # ---------------------------------------------------------------- helpers

    def _flat(self, prefix, node) -> list[str]:
        out = []
        for key, value in node.items():
            if isinstance(value, dict) and key != "config":
                out += self._flat(f"{prefix}{key}.", value)
            else:
                out.append(f"{prefix}{key}={json.dumps(value)}")
        return out

    def dir(self, name: str) -> Path:
        path = self.work / name
        n = 0
        while path.exists():
            n += 1
            path = self.work / f"{name}-{n}"
        path.mkdir(parents=True)
        return path

    def train_args(self, out: Path, *extra: str, steps: int = 4) -> list[str]:
        return ["recipe=finetune_round3", *self.model, "init_from=null", "trainer.progress_bar=false",
                f"output_dir={out}", "data.format=jsonl", f"data.train={self.world / 'train.jsonl'}",
                "data.micro_batch_size=2", "data.num_workers=0", "optim.global_batch_size=4",
                f"optim.max_steps={steps}", "optim.warmup_steps=1", "trainer.checkpoint_every_n_steps=2",
                "trainer.val_every_n_steps=1000", "trainer.sample_every_n_steps=1000", *extra]

    def recaption_args(self, source: str, out: Path, *extra: str) -> list[str]:
        return [str(self.export), source, str(out), "batch_size=2", "num_workers=0", "progress_bar=false",
                "max_new_tokens=6", *extra]

    def record(self, case: Case, result: Result | None = None) -> Case:
        if result is not None:
            case.traceback = TRACEBACK in result.stderr
        self.cases.append(case)
        verdict = "ok  " if case.ok else "FAIL"
        print(f"{verdict} {case.kind:<5} {case.name:<58} expected: {case.expected:<34} got: {case.got}"
              + (f"  [{case.note}]" if case.note else ""), flush=True)
        return case

    # ---------------------------------------------------------------- references

    def setup(self) -> None:
        base = self.dir("base")
        res = self.r.run("altogether.train", self.train_args(base, steps=2))
        if res.rc != 0:
            raise SystemExit(f"could not train the tiny export:\n{res.stderr[-3000:]}")
        self.export = base / "export"
        self.train_ref = self.dir("train-clean")
        res = self.r.run("altogether.train", self.train_args(self.train_ref))
        assert res.rc == 0, res.stderr[-3000:]
        self.train_seconds = res.seconds
        self.rc_source = str(self.world / "shards" / "{00000..00002}.tar")
        self.rc_ref = self.dir("rc-clean") / "out"
        res = self.r.run("altogether.recaption", self.recaption_args(self.rc_source, self.rc_ref))
        assert res.rc == 0, res.stderr[-3000:]
        self.rc_seconds = res.seconds
        self.rc_outputs = [p for p in sorted(self.rc_ref.iterdir()) if p.suffix == ".parquet"]
        self.mix_ref = self.dir("mix-clean") / "mixed"
        module, args = self.v.mix([str(p) for p in self.rc_outputs], out=str(self.mix_ref), shard_size=4)
        res = self.r.run(module, args)
        assert res.rc == 0, res.stderr[-3000:]
        self.mix_seconds = res.seconds
        print(f"references: train {self.train_seconds:.1f}s, recaption {self.rc_seconds:.1f}s, "
              f"mix {self.mix_seconds:.1f}s", flush=True)

    # ---------------------------------------------------------------- invariants

    @staticmethod
    def temporaries(folder: Path) -> list[str]:
        """Hidden files and folders (our temporaries' shape: ``.NAME.XXXX.tmp``, ``.export.*``, ``.wds_out.*``)
        and ``*.tmp`` anywhere under ``folder``, except shard claims' own folder when it holds nothing."""
        found = []
        for p in folder.rglob("*"):
            rel = p.relative_to(folder)
            if any(part.startswith(".") or part.endswith(".tmp") for part in rel.parts):
                if p.is_dir() and p.name == ".claims" or (p.is_dir() and ".claims" in rel.parts):
                    continue
                found.append(str(rel))
        return found

    @staticmethod
    def tree(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, bytes]:
        return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
                if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
                and p.name not in skip}

    @staticmethod
    def bad_checkpoints(run: Path) -> list[str]:
        import torch
        bad = []
        for p in sorted((run / "checkpoints").glob("*.ckpt")) if (run / "checkpoints").is_dir() else []:
            try:
                torch.load(p, map_location="cpu", weights_only=True)
            except Exception as err:
                bad.append(f"{p.name}: {type(err).__name__}")
        return bad

    @staticmethod
    def export_state(export: Path) -> str:
        """'' for no export, 'whole' when weights and config load, else what is wrong."""
        if not export.exists():
            return ""
        try:
            from safetensors.torch import load_file
            load_file(export / "model.safetensors")
            json.loads((export / "altogether.json").read_text())
            return "whole"
        except Exception as err:
            return f"broken ({type(err).__name__})"

    @staticmethod
    def same_weights(a: Path, b: Path) -> bool:
        import torch
        from safetensors.torch import load_file
        left, right = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
        return left.keys() == right.keys() and all(torch.allclose(left[k], right[k], rtol=0, atol=1e-6) for k in left)

    # ---------------------------------------------------------------- faults

    def fault_train(self, name: str, *, trap: Trap | None = None, at: float | None = None,
                    sig: int = signal.SIGKILL) -> None:
        run = self.dir("train-fault")
        args = self.train_args(run)
        if trap is not None:
            res = self.r.run("altogether.train", args, trap=trap)
        else:
            res = self.r.run_until("altogether.train", args, lambda s: s >= at, sig)
        problems = []
        term = (trap.sig if trap else sig) == signal.SIGTERM
        export_after_kill = self.export_state(run / "export")
        if export_after_kill.startswith("broken"):
            problems.append(f"export {export_after_kill} after the kill")
        bad = self.bad_checkpoints(run)
        if bad:
            problems.append("half-written checkpoint(s) " + ", ".join(bad))
        first = f"exit {res.rc}"
        nothing_yet = not any((run / "checkpoints").glob("*.ckpt")) if (run / "checkpoints").is_dir() else True
        if term and res.signal == signal.SIGTERM and nothing_yet:
            first = "ended by SIGTERM before training began"  # nothing to save yet: the signal's default is right
        elif term:
            if res.rc == 0:
                if export_after_kill != "whole":
                    problems.append("SIGTERM: exit 0 without an export")
            elif res.rc != 143:
                problems.append(f"SIGTERM: exit {res.rc}, not 143")
            elif not (run / "checkpoints" / "last.ckpt").is_file() or bad:
                problems.append("SIGTERM: exit 143 without a readable last.ckpt")
        if TRACEBACK in res.stderr and res.rc not in (137, 143):
            problems.append("traceback")
        rerun = self.r.run("altogether.train", [*args, *self.v.resume(run)])
        same = lambda: self.export_state(run / "export") == "whole" and self.same_weights(run / "export",
                                                                                         self.train_ref / "export")
        self.settle(name, res, first, problems, rerun, run,
                    lambda: [] if same() else ["resumed export differs from an uninterrupted run's"])

    def fault_recaption(self, name: str, *, trap: Trap | None = None, at: float | None = None,
                        sig: int = signal.SIGKILL, when: Callable[[Path], bool] | None = None) -> None:
        out = self.dir("rc-fault") / "out"
        args = self.recaption_args(self.rc_source, out)
        if trap is not None:
            res = self.r.run("altogether.recaption", args, trap=trap)
        elif when is not None:
            res = self.r.run_until("altogether.recaption", args, lambda s: when(out), sig)
        else:
            res = self.r.run_until("altogether.recaption", args, lambda s: s >= at, sig)
        term = (trap.sig if trap else sig) == signal.SIGTERM
        problems = []
        if out.is_dir():
            for p in out.glob("*.parquet"):
                ref = self.rc_ref / p.name
                if not ref.is_file() or p.read_bytes() != ref.read_bytes():
                    problems.append(f"{p.name} half written or different after the kill")
            if (out / "summary.json").is_file():
                try:
                    json.loads((out / "summary.json").read_text())
                except ValueError:
                    problems.append("summary.json half written after the kill")
        began = out.is_dir() and any(out.glob("*.parquet"))
        if term and res.signal == signal.SIGTERM and not began:
            pass  # ended by the signal while loading, before any work: nothing to save, the default is right
        elif term and res.rc != 0:
            if res.rc != 143:
                problems.append(f"SIGTERM: exit {res.rc}, not 143")
            elif not (out / "summary.json").is_file():
                problems.append("SIGTERM: exit 143 without summary.json")
        if term and res.rc == 0 and self.tree(out, ("summary.json",)) != self.tree(self.rc_ref, ("summary.json",)):
            problems.append("SIGTERM: exit 0 but outputs incomplete")
        rerun = self.r.run("altogether.recaption", args)
        self.settle(name, res, f"exit {res.rc}", problems, rerun, out, lambda: [
            *(["outputs differ from a clean run's"] if self.tree(out, ("summary.json",)) != self.tree(
                self.rc_ref, ("summary.json",)) else []),
            *([f"summary counts {_counts(out)} != clean {_counts(self.rc_ref)}"] if _counts(out) != _counts(
                self.rc_ref) else [])])

    def fault_mix(self, name: str, *, trap: Trap | None = None, at: float | None = None,
                  sig: int = signal.SIGKILL, parquet: bool = False) -> None:
        folder = self.dir("mix-fault")
        out = folder / ("mixed.parquet" if parquet else "mixed")
        module, args = self.v.mix([str(p) for p in self.rc_outputs], out=str(out), shard_size=4)
        if trap is not None:
            res = self.r.run(module, args, trap=trap)
        else:
            res = self.r.run_until(module, args, lambda s: s >= at, sig)
        problems = []
        ref = self.mix_parquet_ref if parquet else self.mix_ref
        if out.exists() and res.rc != 0 and _mix_content(out) != _mix_content(ref):
            problems.append("a partial output left in place after the kill")
        rerun = self.r.run(module, args)
        self.settle(name, res, f"exit {res.rc}", problems, rerun, folder,
                    lambda: [] if _mix_content(out) == _mix_content(ref) else ["output differs from a clean run's"])

    def fault_annotate(self, name: str, trap: Trap) -> None:
        folder = self.dir("ann-fault")
        records = folder / "records.jsonl"
        res = self.r.run(*self.v.annotate("from-ft", [str(self.world / "ft.json"), str(records)]), cwd=folder)
        assert res.rc == 0, res.stderr
        tasks = str(folder / "tasks-{vendor}.jsonl")
        module, args = self.v.annotate("next-round", [str(records), tasks], vendors="A,B,C")
        res = self.r.run(module, args, cwd=folder, trap=trap)
        problems = []
        made = sorted(p.name for p in folder.glob("tasks-*.jsonl"))
        if made and len(made) != 3:
            problems.append(f"{len(made)} of 3 vendor files after the kill")
        rerun = self.r.run(module, args, cwd=folder)
        def differences() -> list[str]:
            clean = self.dir("ann-clean")
            shutil.copy(records, clean / "records.jsonl")
            tasks = str(clean / "tasks-{vendor}.jsonl")
            self.r.run(*self.v.annotate("next-round", [str(clean / "records.jsonl"), tasks], vendors="A,B,C"),
                       cwd=clean)
            files = lambda f: {p.name: p.read_bytes() for p in f.glob("tasks-*.jsonl")}
            return [] if files(folder) == files(clean) else ["vendor files differ from a clean run's"]
        self.settle(name, res, f"exit {res.rc}", problems, rerun, folder, differences)

    def settle(self, name: str, killed: Result, first: str, problems: list[str], rerun: Result, folder: Path,
               differences: Callable[[], list[str]]) -> None:
        """Record a fault: survived when no ``problems`` were seen after the kill and the rerun exits 0, leaves no
        temporaries under ``folder`` and shows none of ``differences()`` from a clean run."""
        if rerun.rc != 0:
            problems.append(f"rerun exit {rerun.rc}: {_last_line(rerun.stderr)}")
        else:
            stale = self.temporaries(folder)
            problems += [f"temporaries left: {stale[:3]}"] * bool(stale) + differences()
        if not killed.played:
            problems.append("not played: the trapped write never happened")
        self.record(Case("fault", name, "survive", f"{first}; rerun exit {rerun.rc}", not problems,
                         note="; ".join(problems), played=killed.played), rerun)

    def faults(self) -> None:
        K, T = signal.SIGKILL, signal.SIGTERM
        # training (4 optimizer steps, a checkpoint every 2): chosen moments, then random ones
        self.fault_train("train: SIGKILL writing last.ckpt over a good one", trap=Trap("write", "*last.ckpt*", K, 2))
        self.fault_train("train: SIGKILL writing step000004.ckpt", trap=Trap("write", "*step000004.ckpt*", K))
        self.fault_train("train: SIGKILL writing the export's weights", trap=Trap("write", "*model.safetensors*", K))
        self.fault_train("train: SIGKILL renaming the export into place", trap=Trap("rename", "export", K))
        self.fault_train("train: SIGTERM after step000002.ckpt", trap=Trap("rename", "step000002.ckpt", T))
        self.fault_train("train: SIGTERM writing the export", trap=Trap("write", "*model.safetensors*", T))
        for sig in (K, K, T, T):
            at = self.rng.uniform(0, self.train_seconds)
            self.fault_train(f"train: {sig.name} at random {at:.2f}s of {self.train_seconds:.1f}s", at=at, sig=sig)
        # recaption (3 shards of 5): chosen moments, then random ones
        # output names: 00000.recaption.parquet (00000.parquet in older versions)
        done = lambda shard: (lambda out: any(out.glob(f"{shard}*.parquet")))
        self.fault_recaption("recaption: SIGKILL mid-shard (shard 1 in progress)", when=done("00000"))
        self.fault_recaption("recaption: SIGKILL writing shard 1's output",
                             trap=Trap("write", "*00001*.parquet*", K))
        self.fault_recaption("recaption: SIGKILL renaming shard 2's output into place",
                             trap=Trap("rename", "00002*.parquet", K))
        self.fault_recaption("recaption: SIGKILL writing summary.json", trap=Trap("write", "*summary.json*", K))
        self.fault_recaption("recaption: SIGTERM mid-shard (shard 1 in progress)", sig=T,
                             when=done("00000"))
        self.fault_recaption("recaption: SIGTERM writing shard 1's output",
                             trap=Trap("write", "*00001*.parquet*", T))
        for sig in (K, K, T):
            at = self.rng.uniform(0, self.rc_seconds)
            self.fault_recaption(f"recaption: {sig.name} at random {at:.2f}s of {self.rc_seconds:.1f}s", at=at,
                                 sig=sig)
        # mix into webdataset shards of 4 (and one Parquet file)
        module, args = self.v.mix([str(p) for p in self.rc_outputs], out=str(self.work / "mix-clean.parquet"))
        assert self.r.run(module, args).rc == 0
        self.mix_parquet_ref = self.work / "mix-clean.parquet"
        self.fault_mix("mix: SIGKILL writing the 2nd webdataset shard", trap=Trap("write", "*.tar*", K, 2))
        self.fault_mix("mix: SIGKILL writing the Parquet output", trap=Trap("write", "*mixed.parquet*", K),
                       parquet=True)
        self.fault_mix("mix: SIGKILL writing the summary", trap=Trap("write", "*summary*", K))
        self.fault_mix("mix: SIGTERM writing a webdataset shard", trap=Trap("write", "*.tar*", T))
        at = self.rng.uniform(0, self.mix_seconds)
        self.fault_mix(f"mix: SIGKILL at random {at:.2f}s of {self.mix_seconds:.1f}s", at=at, sig=K)
        # annotate next-round with several vendors: all-or-nothing
        self.fault_annotate("annotate next-round: SIGKILL writing vendor B's file",
                            Trap("write", "*tasks-B.jsonl*", K))

    # ---------------------------------------------------------------- inputs

    def expect(self, name: str, expected: str, res: Result, *, names: tuple[str, ...] = (),
               check: Callable[[], str] | None = None) -> None:
        """``expected``: "error" (exit 2, last stderr line ``error: ...`` naming one of ``names``), "skip" (exit
        0 or 1, ``check`` says the sample was counted), "ok" (exit 0 and ``check`` passes) or "error|skip"."""
        tb = TRACEBACK in res.stderr
        line = _last_line(res.stderr)
        if tb:
            got = f"traceback ({_exception(res.stderr)})"
        elif res.rc == 2 and line.startswith("error:"):
            got = "error, exit 2"
        else:
            got = f"exit {res.rc}" + (f": {line[:60]}" if res.rc and line else "")
        ok, note, allowed = False, "", expected.split("|")
        if tb:
            note = _last_line(res.stderr)[:100]
        else:
            if "error" in allowed and got == "error, exit 2":
                ok = not names or any(n in line for n in names)
                note = "" if ok else f"does not name {names[0]!r}: {line[:90]}"
            if not ok and ("skip" in allowed or "ok" in allowed) and res.rc in (0, 1):
                note = check() if check else ""
                ok = not note and (res.rc == 0 or "skip" in allowed)  # exit 1: a shard held nothing captionable
                if res.rc and not ok:
                    note = note or f"exit {res.rc}"
        self.record(Case("input", name, expected, got, ok, note=note), res)

    def summary_counts_bad(self, out: Path, at_least: int = 1, peak: Result | None = None) -> Callable[[], str]:
        def check() -> str:
            path = out / "summary.json"
            if not path.is_file():
                return "no summary.json"
            s = json.loads(path.read_text())
            bad = _bad_count(s)
            if bad < at_least:
                return f"summary counts {bad} bad sample(s)"
            if peak is not None and peak.peak_rss > THIN_PEAK_LIMIT:
                return f"peak memory {peak.peak_rss / 2**30:.1f} GiB"
            return ""
        return check

    def rc_case(self, name: str, samples: dict[str, bytes] | None = None, *, expected: str = "skip",
                names: tuple[str, ...] = (), shards: dict[str, bytes] | None = None, extra: tuple[str, ...] = (),
                source: str | None = None, check=None, at_least: int = 1) -> None:
        """Recaption 1 good shard plus either a shard holding one bad sample (``samples``: member ext -> bytes)
        among good ones, or whole extra shard files (``shards``: file name -> bytes)."""
        folder = self.dir("rc-in")
        shutil.copy(self.world / "shards" / "00000.tar", folder / "00000.tar")
        if samples is not None:
            good = [(f"g{j}", {"png": (self.world / "images" / f"{j:03d}.png").read_bytes(),
                               "json": json.dumps({"caption": f"zorbit K-{j}"}).encode()}) for j in range(2)]
            write_tar(folder / "00001.tar", [good[0], ("bad", samples), good[1]])
        for fname, data in (shards or {}).items():
            (folder / fname).write_bytes(data)
        out = folder / "out"
        res = self.r.run("altogether.recaption", self.recaption_args(source or str(folder / "*.tar*"), out, *extra),
                         cwd=folder)
        self.expect(name, expected, res, names=names,
                    check=check(out) if check else self.summary_counts_bad(out, at_least, res))

    def manifest_case(self, name: str, rows: list | bytes, *, expected: str = "skip", names=("manifest",),
                      suffix: str = ".jsonl", check=None) -> None:
        folder = self.dir("manifest-in")
        shutil.copytree(self.world / "images", folder / "images")
        path = folder / f"manifest{suffix}"
        if isinstance(rows, bytes):
            path.write_bytes(rows)
        else:
            write_jsonl(path, rows)
        out = folder / "out"
        res = self.r.run("altogether.recaption", self.recaption_args(str(path), out), cwd=folder)
        self.expect(name, expected, res, names=names, check=check(out) if check else self.summary_counts_bad(out))

    def train_case(self, name: str, extra: list[str], *, expected: str = "error", names: tuple[str, ...] = (),
                   train: bytes | list | None = None, check=None, steps: int = 2) -> None:
        folder = self.dir("train-in")
        run = folder / "run"
        if train is not None:
            shutil.copytree(self.world / "images", folder / "images")
            path = folder / "train.jsonl"
            path.write_bytes(train) if isinstance(train, bytes) else write_jsonl(path, train)
            extra = [f"data.train={path}", *extra]
        res = self.r.run("altogether.train", self.train_args(run, *extra, steps=steps), cwd=folder)
        self.expect(name, expected, res, names=names, check=(lambda: check(run)) if check else
                    (lambda: "" if self.export_state(run / "export") == "whole" else "no export"))

    def rc_setting(self, name: str, setting: str, names: tuple[str, ...]) -> None:
        out = self.dir("rc-set") / "out"
        res = self.r.run("altogether.recaption", self.recaption_args(self.rc_source, out, setting))
        self.expect(name, "error", res, names=names)

    def mix_case(self, name: str, rows: list | bytes | None, *, expected: str = "error",
                 names=("rows.recaption.jsonl",), check=None, suffix: str = ".jsonl", **settings) -> None:
        """``mix`` on one input file of ``rows``, named as recaption names its outputs (``rows.recaption.jsonl``:
        mix reads only those since 9cd7ef8; earlier versions take any name)."""
        folder = self.dir("mix-in")
        path = folder / f"rows.recaption{suffix}"
        if isinstance(rows, bytes):
            path.write_bytes(rows)
        elif rows is not None:
            write_jsonl(path, rows)
        out = folder / "mixed"
        settings.setdefault("out", str(out))
        module, args = self.v.mix([str(path)], **settings)
        res = self.r.run(module, args, cwd=folder)
        self.expect(name, expected, res, names=names, check=(lambda: check(folder)) if check else None)

    def annotate_case(self, name: str, action: str, positional: list[str], files: dict[str, bytes], *,
                      expected: str = "error", names=(), check=None, umask: int = 0o022,
                      setup_mode: int | None = None, **settings) -> None:
        folder = self.dir("ann-in")
        for fname, data in files.items():
            (folder / fname).write_bytes(data)
            if setup_mode is not None:
                (folder / fname).chmod(setup_mode)
        module, args = self.v.annotate(action, [str(folder / p) for p in positional], **settings)
        res = self.r.run(module, args, cwd=folder, umask=umask)
        self.expect(name, expected, res, names=names, check=(lambda: check(folder)) if check else None)

    def export_case(self, name: str, damage: Callable[[Path], None], names: tuple[str, ...]) -> None:
        folder = self.dir("export-in")
        export = folder / "export"
        shutil.copytree(self.export, export)
        damage(export)
        out = folder / "out"
        res = self.r.run("altogether.recaption", [str(export), self.rc_source, str(out), "batch_size=2",
                                                  "num_workers=0", "progress_bar=false"], cwd=folder)
        self.expect(f"recaption: {name}", "error", res, names=names)
        res = self.r.run(None, [str(export)], code=RECAPTIONER_LOAD, cwd=folder)
        self.expect(f"Recaptioner.from_pretrained: {name}", "error", res, names=names)

    def eval_case(self, name: str, model: Path, data: Path, extra: tuple[str, ...] = (), *, expected="error",
                  names=(), check=None) -> None:
        out = self.dir("eval-out")
        res = self.r.run("altogether.evaluate", [str(model), str(data), f"output_dir={out}", "clip_score=false",
                                                 "max_new_tokens=6", "progress=false", "batch_size=4", *extra],
                         cwd=self.world)
        self.expect(name, expected, res, names=names, check=(lambda: check(out)) if check else None)

    def inputs(self) -> None:
        img = lambda j: (self.world / "images" / f"{j:03d}.png").read_bytes()
        good_png = img(0)
        # ---- §1: one sample never stops a run (webdataset shards) ----
        self.rc_case("recaption: thin PNG 1x20,000 in a shard", {"png": png_bytes(1, 20_000), "json": b"{}"})
        self.rc_case("recaption: thin PNG 1x2,000,000 in a shard", {"png": png_bytes(1, 2_000_000), "json": b"{}"})
        self.rc_case("recaption: thin PNG 20,000x1 in a shard", {"png": png_bytes(20_000, 1), "json": b"{}"})
        self.rc_case("recaption: PNG header 60,000x60,000 (bomb)", {"png": png_header_only(60_000, 60_000)})
        self.rc_case("recaption: zero-byte image", {"jpg": b"", "json": b"{}"})
        self.rc_case("recaption: HTML saved as .jpg", {"jpg": b"<html><body>403 Forbidden</body></html>",
                                                       "json": b"{}"})
        self.rc_case("recaption: truncated PNG", {"png": good_png[: len(good_png) // 2]})
        self.rc_case("recaption: text file as .png", {"png": b"hello world\n" * 20})
        self.rc_case("recaption: sample without an image member", {"json": b'{"caption": "no image"}'})
        self.rc_case("recaption: sample json not JSON", {"png": good_png, "json": b"{not json"},
                     expected="ok|skip", check=self._captioned_or_counted)
        self.rc_case("recaption: sample json caption is a number", {"png": good_png, "json": b'{"caption": 12}'},
                     expected="ok|skip", check=self._captioned_or_counted)
        self.rc_case("recaption: non-UTF-8 .txt alt-text", {"png": good_png, "txt": b"caf\xe9 \xff\xfe"},
                     expected="ok|skip", check=self._captioned_or_counted)
        # ---- a shard's fault is that shard's ----
        with open(self.world / "shards" / "00001.tar", "rb") as f:
            tar = f.read()
        self.rc_case("recaption: truncated tar shard", shards={"00001.tar": tar[: len(tar) // 2 + 100]},
                     expected="skip", check=self._shard_fault_reported)
        self.rc_case("recaption: empty (0-byte) tar shard", shards={"00001.tar": b""}, expected="skip",
                     check=self._shard_fault_reported)
        self.rc_case("recaption: HTML error page saved as a .tar shard",
                     shards={"00001.tar": b"<html>503 Service Unavailable</html>"}, expected="skip",
                     check=self._shard_fault_reported)
        gz = io.BytesIO()
        with tarfile.open(fileobj=gz, mode="w:gz") as t:
            with tarfile.open(self.world / "shards" / "00001.tar") as src:
                for m in src.getmembers():
                    t.addfile(m, src.extractfile(m))
        self.rc_case("recaption: .tar.gz shard (all 5 samples captioned)", shards={"00001.tar.gz": gz.getvalue()},
                     expected="ok", check=lambda out: lambda: self._all_captioned(out, 10))
        self.rc_case("recaption: INPUT pattern matching nothing", None, source=str(self.work / "nothing-*.tar"),
                     expected="error", names=("nothing-",))
        # ---- manifests ----
        rows = [{"key": f"m{i}", "img_path": f"images/{i:03d}.png", "alt": f"zorbit K-{i}"} for i in range(4)]
        self.manifest_case("manifest: integer img_path",
                           [*rows[:2], {"key": "x", "img_path": 7, "alt": "a"}, *rows[2:]])
        self.manifest_case("manifest: null img_path", [*rows[:2], {"key": "x", "img_path": None, "alt": "a"}])
        self.manifest_case("manifest: img_path of a missing file", [*rows, {"key": "x", "img_path": "images/nope.png"}])
        self.manifest_case("manifest: img_path is a list", [*rows, {"key": "x", "img_path": ["a.png"], "alt": "a"}])
        self.manifest_case("manifest: alt is a number", [*rows, {"key": "x", "img_path": "images/005.png", "alt": 5}],
                           expected="ok|skip", check=lambda out: self._captioned_or_counted(out))
        self.manifest_case("manifest: alt is an object",
                           [*rows, {"key": "x", "img_path": "images/005.png", "alt": {"a": 1}}],
                           expected="ok|skip", check=lambda out: self._captioned_or_counted(out))
        jsonl = "".join(json.dumps(r) + "\n" for r in rows).encode()
        self.manifest_case("manifest: non-UTF-8 byte in JSONL",
                           jsonl + b'{"key": "x\xff", "img_path": "images/005.png"}\n',
                           expected="error|skip")
        self.manifest_case("manifest: JSONL with a line that is not JSON", jsonl + b"{oops\n", expected="error|skip")
        self.manifest_case("manifest: empty JSONL file", b"", expected="error")
        self.manifest_case("manifest: JSONL of JSON arrays", b"[1, 2]\n[3, 4]\n", expected="error")
        import pyarrow as pa
        import pyarrow.parquet as pq
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows), buf)
        self.manifest_case("manifest: truncated Parquet", buf.getvalue()[: len(buf.getvalue()) // 2],
                           suffix=".parquet", expected="error|skip")
        self.manifest_case("manifest: Parquet without an img_path column",
                           _parquet([{"key": "a", "alt": "x"}]), suffix=".parquet", expected="error",
                           names=("img_path",))
        # ---- recaption settings (§5) ----
        for setting, names in [
            ("max_new_tokens=100000", ("max_new_tokens",)), ("max_new_tokens=0", ("max_new_tokens",)),
            ("max_new_tokens=-1", ("max_new_tokens",)), ("top_p=2", ("top_p",)), ("top_p=-0.5", ("top_p",)),
            ("do_sample=true temperature=0", ("temperature",)), ("top_k=-1", ("top_k",)),
            ("num_beams=0", ("num_beams",)),
            ("repetition_penalty=0", ("repetition_penalty",)), ("batch_size=0", ("batch_size",)),
            ("batch_size=-2", ("batch_size",)), ("batch_size=abc", ("batch_size",)),
            ("num_workers=-1", ("num_workers",)),
            ("num_captions=0", ("num_captions",)), ("num_candidates=0", ("num_candidates",)),
            ("output_format=csv", ("output_format",)), ("input_format=xml", ("input_format",)),
            ("dtype=float7", ("dtype",)), ("foo=1", ("foo",)), ("max_listed_bad=-1", ("max_listed_bad",)),
        ]:
            out = self.dir("rc-set") / "out"
            res = self.r.run("altogether.recaption", self.recaption_args(self.rc_source, out, *setting.split()))
            self.expect(f"recaption: {setting}", "error", res, names=names)
        afile = self.work / "a-file.txt"
        afile.write_text("x")
        res = self.r.run("altogether.recaption", [str(self.export), self.rc_source, str(afile), "num_workers=0"])
        self.expect("recaption: OUTPUT naming a file", "error", res, names=("a-file.txt",))
        res = self.r.run("altogether.recaption", [str(self.work / "no-export"), self.rc_source, str(self.work / "o")])
        self.expect("recaption: MODEL folder missing", "error", res, names=("no-export",))
        folder = self.dir("rc-folder")
        for j in range(3):
            (folder / f"{j}.png").write_bytes(img(j))
        (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
        res = self.r.run("altogether.recaption", self.recaption_args(str(folder), folder.parent / "folder-out",
                                                                     "shard_size=0"))
        self.expect("recaption: folder INPUT, shard_size=0", "error", res, names=("shard_size",))
        out = folder.parent / "folder-out2"
        res = self.r.run("altogether.recaption", self.recaption_args(str(folder), out))
        self.expect("recaption: folder INPUT with one broken JPEG", "skip", res, check=self.summary_counts_bad(out))
        # ---- §4: damaged and newer exports ----
        weights = "model.safetensors"
        self.export_case("truncated model.safetensors",
                         lambda e: os.truncate(e / weights, (e / weights).stat().st_size // 2), (weights,))
        self.export_case("zero-byte model.safetensors", lambda e: os.truncate(e / weights, 0), (weights,))
        self.export_case("truncated encoder weights", self._truncate_encoder, ("encoder",))
        self.export_case("unknown key in altogether.json (newer version)",
                         lambda e: _edit_json(e / "altogether.json", lambda m: {**m, "future_key": 1}),
                         ("future_key",))
        self.export_case("altogether.json not JSON", lambda e: (e / "altogether.json").write_text("{oops"),
                         ("altogether.json",))
        self.export_case("altogether.json missing", lambda e: (e / "altogether.json").unlink(), ("altogether.json",))
        self.export_case("tokenizer folder missing", lambda e: shutil.rmtree(e / "tokenizer"), ("tokenizer",))
        # ---- the Recaptioner API on single bad images ----
        for label, data in [("thin PNG 1x2,000,000", png_bytes(1, 2_000_000)), ("zero-byte image", b""),
                            ("HTML bytes", b"<html>nope</html>")]:
            res = self.r.run(None, [str(self.export), label], code=RECAPTIONER_IMAGE.replace("DATA", repr(data)))
            self.expect(f"Recaptioner.recaption: {label}", "error", res, names=("image",))
        # ---- training data and validation (§1) ----
        rows = [json.loads(line) for line in (self.world / "train.jsonl").read_text().splitlines()]
        val = self.dir("val-bad")
        shutil.copytree(self.world / "images", val / "images")
        (val / "images" / "000.png").write_bytes(b"not an image")
        write_jsonl(val / "val.jsonl", rows[:3])
        self.train_case("train: unreadable image among the first validation records",
                        [f"data.val={val / 'val.jsonl'}", "trainer.val_every_n_steps=2",
                         "trainer.sample_every_n_steps=2", "trainer.num_sample_images=2"], expected="ok", steps=4)
        broken = [dict(r) for r in rows]
        broken[5]["img_path"] = "images/missing.png"
        self.train_case("train: one training image missing", [], expected="ok|skip", train=broken)
        broken = [dict(r) for r in rows]
        broken[5]["img_path"] = 5
        self.train_case("train: integer img_path in a training row", [], expected="ok|skip|error", train=broken,
                        names=("img_path",))
        broken = [dict(r) for r in rows]
        broken[5]["round3"] = 42
        self.train_case("train: target caption is a number", [], expected="ok|skip|error", train=broken,
                        names=("round3",))
        broken = [dict(r) for r in rows]
        del broken[5]["round3"]
        self.train_case("train: a row without its target caption", [], expected="ok|skip|error", train=broken,
                        names=("round3",))
        body = (self.world / "train.jsonl").read_bytes()
        self.train_case("train: non-UTF-8 byte in the training JSONL", [], expected="error|skip",
                        train=body + b'{"key": "\xff", "img_path": "images/001.png", "round3": "x"}\n',
                        names=("train.jsonl",))
        self.train_case("train: a training JSONL line that is not JSON", [], expected="error|skip",
                        train=body + b"{oops\n", names=("train.jsonl",))
        self.train_case("train: empty training JSONL", [], expected="error", train=b"", names=("train.jsonl",))
        # ---- §5: training settings ----
        afile = self.work / "a-file.txt"
        bad_yaml = self.work / "bad.yaml"
        bad_yaml.write_text("optim:\n  lr: [1e-4\n")
        list_yaml = self.work / "list.yaml"
        list_yaml.write_text("- optim\n- data\n")
        empty_yaml = self.work / "empty.yaml"
        empty_yaml.write_text("")
        for setting, names in [
            ("data.micro_batch_size=0", ("data.micro_batch_size",)),
            ("data.micro_batch_size=-1", ("data.micro_batch_size",)),
            ("trainer.val_every_n_steps=0", ("trainer.val_every_n_steps",)),
            ("trainer.sample_every_n_steps=0", ("trainer.sample_every_n_steps",)),
            ("trainer.checkpoint_every_n_steps=0", ("trainer.checkpoint_every_n_steps",)),
            ("trainer.log_every_n_steps=0", ("trainer.log_every_n_steps",)),
            ("optim.max_steps=0", ("optim.max_steps",)), ("optim.max_steps=-5", ("optim.max_steps",)),
            ("optim.lr=-1", ("optim.lr",)), ("optim.lr=abc", ("optim.lr",)),
            ("optim.global_batch_size=3", ("optim.global_batch_size", "micro_batch_size")),
            ("optim.global_batch_size=0", ("optim.global_batch_size",)),
            ("optim.warmup_steps=-1", ("optim.warmup_steps",)),
            ("optim.betas=[0.9]", ("optim.betas",)), ("optim.betas=[0.9,1.5]", ("optim.betas",)),
            ("optim.weight_decay=-0.1", ("optim.weight_decay",)),
            ("data.num_workers=-1", ("data.num_workers",)),
            ("trainer.accelerator=gpu", ("trainer.accelerator",)),
            ("trainer.accelerator=quantum", ("trainer.accelerator",)),
            ("trainer.devices=0", ("trainer.devices",)),
            ("trainer.precision=fp7", ("trainer.precision",)),
            ("data.format=xml", ("data.format",)),
            ("layout.max_caption_tokens=0", ("layout.max_caption_tokens",)),
            ("layout.max_alt_tokens=-1", ("layout.max_alt_tokens",)),
            ("layout.prompt_dropout=1.5", ("layout.prompt_dropout",)),
            ("trainer.foo=1", ("trainer.foo", "foo")),
            (f"output_dir={afile}", ("output_dir", "a-file.txt")),
            (f"data.train={self.work / 'no-such.jsonl'}", ("no-such.jsonl",)),
            (f"model.decoder.tokenizer={self.work / 'no-tokenizer'}", ("no-tokenizer",)),
        ]:
            self.train_case(f"train: {setting.replace(str(self.work) + '/', '')}", [setting], names=names)
        for path, label in [(bad_yaml, "a YAML syntax error"), (list_yaml, "a list as the recipe"),
                            (empty_yaml, "an empty recipe file")]:
            res = self.r.run("altogether.train", [f"recipe={path}", f"output_dir={self.work / 'yaml-run'}"])
            self.expect(f"train: recipe file with {label}", "error", res, names=(path.name,))
        res = self.r.run("altogether.train", ["recipe=no_such_recipe"])
        self.expect("train: unknown recipe name", "error", res, names=("no_such_recipe",))
        # ---- §4 permissions and published names ----
        out = self.dir("umask") / "out"
        res = self.r.run("altogether.recaption", self.recaption_args(self.rc_source, out), umask=0o002)
        self.expect("recaption under umask 002: outputs 0664", "ok", res, check=lambda: _modes(out, 0o664, 0o775))
        run = self.dir("umask-train") / "run"
        res = self.r.run("altogether.train", self.train_args(run, steps=2), umask=0o002)
        self.expect("train under umask 002: export 0664/0775", "ok", res,
                    check=lambda: _modes(run / "export", 0o664, 0o775))
        folder = self.dir("umask-mix")
        module, args = self.v.mix([str(p) for p in self.rc_outputs], out=str(folder / "m.parquet"))
        res = self.r.run(module, args, umask=0o022)
        self.expect("mix under umask 022: output 0644", "ok", res, check=lambda: _modes(folder, 0o644, 0o755,
                                                                                        only="m.parquet"))
        records = _records_from_ft(self)
        def merged_mode(folder: Path) -> str:
            mode = stat.S_IMODE((folder / "records.jsonl").stat().st_mode)
            return "" if mode == 0o664 else f"mode {oct(mode)} after an in-place merge, was 0o664"
        self.annotate_case("annotate merge in place keeps a shared 0664 file's mode", "merge",
                           ["records.jsonl", "tasks.jsonl", "records.jsonl"],
                           {"records.jsonl": records, "tasks.jsonl": _done_tasks(self, records)},
                           expected="ok", check=merged_mode, umask=0o002, setup_mode=0o664)
        res = self.r.run(None, [str(self.export.parent), str(self.work / "pushed")], code=HUB_PUSH)
        self.expect("hub push: card and metadata publish no local folders", "ok", res,
                    check=lambda: _no_local_paths(self.work / "pushed", str(self.work)))
        # ---- §4 mix files ----
        def tar_members(folder: Path) -> list[str]:
            names = []
            for t in (folder / "mixed").glob("*.tar") if (folder / "mixed").is_dir() else []:
                with tarfile.open(t) as tf:
                    names += [(m.name, tf.extractfile(m).read()) for m in tf.getmembers() if m.isfile()]
            return names
        def no_escape(folder: Path) -> str:
            for name, data in tar_members(folder):
                if name.startswith("/") or ".." in name.split("/") or b"root:" in data or b"secret-home" in data:
                    return f"member {name!r} copied"
            return ""
        base = {"alt_text": "a", "caption": "b"}
        secret = self.work / "home" / ".bashrc"
        secret.parent.mkdir(exist_ok=True)
        secret.write_text("secret-home\n")
        self.mix_case("mix with_images: img_path=/etc/passwd",
                      [{"key": "k1", "img_path": "/etc/passwd", **base}], expected="error|skip", names=("passwd",),
                      check=no_escape, with_images=True, image_root="images")
        self.mix_case("mix with_images: img_path=../../ escaping the root",
                      [{"key": "k1", "img_path": "../" * 6 + str(secret).lstrip("/"), **base}], expected="error|skip",
                      names=("..",), check=no_escape, with_images=True, image_root="images")
        self.mix_case("mix: key=/abs/evil becomes no absolute member",
                      [{"key": "/abs/evil", **base}, {"key": "ok", **base}], expected="ok|skip|error",
                      names=("/abs/evil",), check=no_escape)
        self.mix_case("mix: key=../evil becomes no escaping member",
                      [{"key": "../evil", **base}, {"key": "ok", **base}], expected="ok|skip|error",
                      names=("../evil",), check=no_escape)
        self.mix_case("mix: non-UTF-8 input", b'{"key": "a", "alt_text": "caf\xe9", "caption": "x"}\n')
        self.mix_case("mix: integer img_path with images", [{"key": "a", "img_path": 3, **base}],
                      expected="error|skip", names=("img_path",), check=lambda f: "", with_images=True)
        self.mix_case("mix: integer url", [{"key": "a", "url": 3, **base}], expected="error|ok",
                      names=("url",), check=lambda f: "")
        self.mix_case("mix: empty input file", b"")
        self.mix_case("mix: a line that is not JSON", b'{"key": "a", "alt_text": "x", "caption": "y"}\n{oops\n')
        self.mix_case("mix: missing input file", None)
        self.mix_case("mix: truncated Parquet input", _parquet([{"key": "a", **base}] * 50)[:200], suffix=".parquet",
                      names=("rows.recaption.parquet",))
        rows = [{"key": f"k{i}", **base} for i in range(4)]
        for setting, value, names in [("p", 2, ("p",)), ("p", -0.1, ("p",)), ("shard_size", 0, ("shard_size",)),
                                      ("shard_size", -1, ("shard_size",)), ("alt_top", 1.5, ("alt_top",)),
                                      ("caption_top", -1, ("caption_top",)), ("target", "video", ("target",))]:
            self.mix_case(f"mix: {setting}={value}", rows, names=names + (setting.replace("_", "-"),),
                          **{setting: value})
        self.mix_case("mix: out naming an existing file", rows, names=("a-file.txt",), out=str(afile))
        # ---- annotate ----
        ft = (self.world / "ft.json").read_bytes()
        self.annotate_case("annotate from-ft: non-UTF-8 file", "from-ft", ["ft.json", "out.jsonl"],
                           {"ft.json": ft.replace(b"zorbit", b"zorb\xefit", 1)}, expected="error|ok",
                           names=("ft.json",), check=lambda f: "")
        self.annotate_case("annotate from-ft: not JSON", "from-ft", ["ft.json", "out.jsonl"], {"ft.json": b"{oops"},
                           names=("ft.json",))
        self.annotate_case("annotate from-ft: no data list", "from-ft", ["ft.json", "out.jsonl"],
                           {"ft.json": b'{"rows": []}'}, names=("ft.json", "data"))
        self.annotate_case("annotate from-ft: entries are numbers", "from-ft", ["ft.json", "out.jsonl"],
                           {"ft.json": b'{"data": [1, 2]}'}, names=("ft.json",))
        self.annotate_case("annotate from-ft: empty file", "from-ft", ["ft.json", "out.jsonl"], {"ft.json": b""},
                           names=("ft.json",))
        self.annotate_case("annotate merge: tasks file not JSONL", "merge", ["r.jsonl", "t.jsonl", "o.jsonl"],
                           {"r.jsonl": records, "t.jsonl": b"{oops\n"}, names=("t.jsonl",))
        self.annotate_case("annotate merge: records file missing", "merge", ["r.jsonl", "t.jsonl", "o.jsonl"],
                           {"t.jsonl": b""}, names=("r.jsonl",))
        self.annotate_case("annotate next-round: OUT naming a folder", "next-round", ["r.jsonl", "."],
                           {"r.jsonl": records}, names=("ann-in",))  # OUT is the case's folder, ann-in-N
        # ---- evaluate ----
        sweep = self.dir("lr=1e-3")
        shutil.copytree(self.export, sweep / "export")
        data = self.dir("data=eval")
        shutil.copytree(self.world / "images", data / "images")
        write_jsonl(data / "eval.jsonl", rows_eval := [json.loads(l) for l in
                                                       (self.world / "val.jsonl").read_text().splitlines()])
        self.eval_case("evaluate: MODEL path containing '='", sweep / "export", self.world / "val.jsonl",
                       expected="ok")
        self.eval_case("evaluate: DATA path containing '='", self.export, data / "eval.jsonl", expected="ok")
        bad = self.dir("eval-bad")
        shutil.copytree(self.world / "images", bad / "images")
        (bad / "images" / "001.png").write_bytes(b"")
        write_jsonl(bad / "eval.jsonl", rows_eval)
        self.eval_case("evaluate: an unreadable image in DATA", self.export, bad / "eval.jsonl", expected="ok|skip")
        for setting, names in [("batch_size=0", ("batch_size",)), ("limit=-1", ("limit",)), ("top_p=2", ("top_p",)),
                               ("max_new_tokens=100000", ("max_new_tokens",)), ("format=xml", ("format",))]:
            self.eval_case(f"evaluate: {setting}", self.export, self.world / "val.jsonl", (setting,), names=names)
        self.eval_case("evaluate: DATA missing", self.export, self.work / "none.jsonl", names=("none.jsonl",))

    # ---------------------------------------------------------------- checks used above

    def _captioned_or_counted(self, out: Path) -> Callable[[], str]:
        def check() -> str:
            s = _summary(out)
            return "" if s and (_captioned(s) > 0) else "nothing captioned"
        return check

    def _shard_fault_reported(self, out: Path) -> Callable[[], str]:
        def check() -> str:
            s = _summary(out)
            if not s:
                return "no summary.json"
            if not any(out.glob("00000*.parquet")):
                return "the good shard was not written"
            text = json.dumps(s)
            return "" if ("00001" in text) else "the damaged shard is not named in the summary"
        return check

    def _all_captioned(self, out: Path, n: int) -> str:
        s = _summary(out)
        if not s:
            return "no summary.json"
        if _captioned(s) != n:
            return f"{_captioned(s)} of {n} captioned"
        if _bad_count(s):
            return f"{_bad_count(s)} reported bad"
        return ""

    def _truncate_encoder(self, export: Path) -> None:
        found = sorted((export / "encoder").rglob("*.safetensors")) + sorted((export / "encoder").rglob("*.bin"))
        if found:
            os.truncate(found[0], found[0].stat().st_size // 2)


# What a notebook user sees of an API error: its type and first line. Handled: a library or builtin error (exit 2
# here); anything else (a raw SafetensorError, MemoryError) is re-raised as a traceback.
_API_ERROR = """
except Exception as err:
    if type(err).__module__.split(".")[0] in ("altogether", "builtins") and not isinstance(err, MemoryError):
        print(f"error: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}", file=sys.stderr)
        sys.exit(2)
    raise
"""

RECAPTIONER_LOAD = """
import sys
from altogether import Recaptioner
try:
    Recaptioner.from_pretrained(sys.argv[1])
""" + _API_ERROR

RECAPTIONER_IMAGE = """
import sys
from altogether import Recaptioner
r = Recaptioner.from_pretrained(sys.argv[1])
try:
    print(r.recaption(DATA, "an alt-text", max_new_tokens=4))
""" + _API_ERROR

HUB_PUSH = """
import runpy, shutil, sys
import huggingface_hub
dest = sys.argv[2]
def create_repo(self, repo_id, **kw):
    return "https://huggingface.co/" + repo_id
def upload_folder(self, *, repo_id, folder_path, **kw):
    shutil.copytree(folder_path, dest)
huggingface_hub.HfApi.create_repo = create_repo
huggingface_hub.HfApi.upload_folder = upload_folder
sys.argv = ["altogether.hub", "push", sys.argv[1], "someone/tiny-altogether"]
runpy.run_module("altogether.hub", run_name="__main__", alter_sys=True)
"""


def _records_from_ft(probe: Probe) -> bytes:
    folder = probe.dir("records")
    module, args = probe.v.annotate("from-ft", [str(probe.world / "ft.json"), str(folder / "r.jsonl")],
                                    timestamp="2026-01-01T00:00:00+00:00")
    res = probe.r.run(module, args, cwd=probe.world)
    assert res.rc == 0, res.stderr
    return (folder / "r.jsonl").read_bytes()


def _done_tasks(probe: Probe, records: bytes) -> bytes:
    folder = probe.dir("tasks")
    (folder / "r.jsonl").write_bytes(records)
    module, args = probe.v.annotate("next-round", [str(folder / "r.jsonl"), str(folder / "t.jsonl")])
    res = probe.r.run(module, args, cwd=folder)
    assert res.rc == 0, res.stderr
    tasks = [json.loads(l) for l in (folder / "t.jsonl").read_text().splitlines()]
    for t in tasks:  # the annotator's work: the prefilled caption reworded, who did it and when
        t.update(caption=f"{t.get('caption') or ''} (edited)", annotator="ann1", vendor=t.get("vendor") or "A",
                 timestamp="2026-02-01T00:00:00Z")  # with a UTC offset, as the task schema asks
    return "".join(json.dumps(t) + "\n" for t in tasks).encode()


def _mix_content(out: Path) -> dict:
    """What a mix output holds, without what differs between two clean runs: tar members as (name, bytes) (a
    tar header records the time it was written), the summary without its paths."""
    if out.is_file():
        return {"": out.read_bytes()}
    content = {}
    for p in sorted(out.rglob("*")) if out.is_dir() else []:
        rel = str(p.relative_to(out))
        if not p.is_file() or rel.startswith("."):
            continue
        if p.suffix == ".tar":
            try:
                with tarfile.open(p) as tar:
                    content[rel] = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]
            except (tarfile.TarError, OSError) as err:
                content[rel] = f"unreadable: {err}"
        elif p.suffix == ".json":
            try:
                content[rel] = {k: v for k, v in json.loads(p.read_text()).items() if k not in ("inputs", "out")}
            except ValueError:
                content[rel] = "unreadable JSON"
        else:
            content[rel] = p.read_bytes()
    return content


def _parquet(rows: list[dict]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    return buf.getvalue()


def _edit_json(path: Path, change) -> None:
    path.write_text(json.dumps(change(json.loads(path.read_text()))))


def _modes(folder: Path, file_mode: int, dir_mode: int, only: str | None = None) -> str:
    if not folder.exists():
        return f"{folder.name} missing"
    for p in [folder / only] if only else [folder, *folder.rglob("*")]:
        if any(part.startswith(".") for part in p.relative_to(folder.parent).parts):
            continue
        want = dir_mode if p.is_dir() else file_mode
        mode = stat.S_IMODE(p.stat().st_mode)
        if mode != want:
            return f"{p.relative_to(folder.parent)} is {oct(mode)}, umask gives {oct(want)}"
    return ""


def _no_local_paths(folder: Path, local: str) -> str:
    if not folder.is_dir():
        return "nothing uploaded"
    for p in folder.rglob("*"):
        if p.is_file() and p.suffix in (".md", ".json", ".yaml", ".txt") and local in p.read_text(errors="replace"):
            return f"{p.relative_to(folder)} names {local}"
    return ""


def _summary(out: Path) -> dict | None:
    try:
        return json.loads((out / "summary.json").read_text())
    except (OSError, ValueError):
        return None


def _captioned(s: dict) -> int:
    n = s.get("samples", {})
    return int(n.get("captioned", 0)) if isinstance(n, dict) else 0


def _bad_count(s: dict) -> int:
    n = s.get("samples", {})
    if not isinstance(n, dict):
        return 0
    return sum(int(v) for k, v in n.items() if k not in ("captioned", "total", "read", "seen") and isinstance(v, int))


def _counts(out: Path) -> dict:
    s = _summary(out) or {}
    return {"samples": s.get("samples"), "shards_written": (s.get("shards") or {}).get("written")}


def _last_line(text: str) -> str:
    lines = [l for l in text.strip().splitlines() if l.strip()]
    return lines[-1].strip() if lines else ""


def _exception(stderr: str) -> str:
    lines = [l for l in stderr.splitlines() if l and not l.startswith(" ")]
    return lines[-1][:80] if lines else ""


# ============================================================================================ main


def probe(world: Path, work: Path, only: str, report: Path | None) -> None:
    preload()
    runner = Runner(work)
    version = detect_version(runner)
    print(f"version: {'--flags' if version.flags else 'key=value'} grammar for mix/annotate; "
          f"resume={'auto' if version.resume_auto else 'true'}", flush=True)
    p = Probe(world, work, version, runner)
    started = time.monotonic()
    p.setup()
    if only in ("all", "faults"):
        p.faults()
    if only in ("all", "inputs"):
        p.inputs()
    faults = [c for c in p.cases if c.kind == "fault"]
    inputs = [c for c in p.cases if c.kind == "input"]
    totals = {"faults_survived": sum(c.ok for c in faults), "faults_tried": len(faults),
              "inputs_handled": sum(c.ok for c in inputs), "inputs_tried": len(inputs),
              "faults_not_played": sum(not c.played for c in faults),
              "failures": sum(not c.ok for c in p.cases), "tracebacks": sum(c.traceback for c in p.cases),
              "minutes": round((time.monotonic() - started) / 60, 1)}
    print(f"\nfaults survived {totals['faults_survived']} / {totals['faults_tried']}; inputs handled "
          f"{totals['inputs_handled']} / {totals['inputs_tried']}; {totals['tracebacks']} of {totals['failures']} "
          f"failures are tracebacks ({totals['minutes']} min)")
    print("still failing:")
    for c in p.cases:
        if not c.ok:
            print(f"  {c.kind}: {c.name}: got {c.got}" + (f" [{c.note}]" if c.note else ""))
    if report:
        report.write_text(json.dumps({"totals": totals, "cases": [c.__dict__ for c in p.cases]}, indent=1))
    print(json.dumps(totals))


def markdown(before: Path, after: Path) -> str:
    """A Markdown table of two ``--json`` reports, case by case: expected, what each version gave."""
    old, new = (json.loads(Path(f).read_text())["cases"] for f in (before, after))
    assert [c["expected"] for c in old] == [c["expected"] for c in new], "not the same list of cases"
    cell = lambda c: ("✓ " if c["ok"] else "✗ ") + c["got"].replace("|", "/")
    rows = ["| case | expected | before | after |", "|---|---|---|---|"]
    for then, now in zip(old, new):  # the same cases in the same order; random moments differ in time
        name = now["name"].split(" at random")[0] + (" at a random moment" if " at random" in now["name"] else "")
        rows.append(f"| {name.replace('|', '/')} | {now['expected'].replace('|', ' or ')} | {cell(then)} | "
                    f"{cell(now)} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkout", type=Path, default=Path(__file__).resolve().parent.parent,
                        help="the checkout under test (its .venv runs the commands)")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a new temporary one)")
    parser.add_argument("--only", choices=("all", "faults", "inputs"), default="all")
    parser.add_argument("--json", type=Path, default=None, help="also write every case and the totals here")
    parser.add_argument("--markdown", type=Path, nargs=2, metavar=("BEFORE_JSON", "AFTER_JSON"),
                        help="print two reports' cases side by side as a Markdown table, and stop")
    parser.add_argument("--build-world", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--probe", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.update(ENV)
    if args.markdown:
        print(markdown(*args.markdown))
        return
    if args.build_world:
        build_world(args.build_world)
        return
    if args.probe:
        # A cluster's layout: temporary files on tmpfs, the run on another filesystem (a rename across them is a
        # copy, which a kill can cut in half)
        scratch = None
        if Path("/dev/shm").is_dir() and os.stat("/dev/shm").st_dev != os.stat(args.work).st_dev:
            scratch = tempfile.mkdtemp(prefix="probe18-", dir="/dev/shm")
            os.environ["TMPDIR"] = tempfile.tempdir = scratch
        try:
            probe(args.probe, args.work, args.only, args.json)
        finally:
            if scratch:
                shutil.rmtree(scratch, ignore_errors=True)
        return
    work = args.work or Path(tempfile.mkdtemp(prefix="probe18-"))
    (work / "world").mkdir(parents=True)
    subprocess.run([sys.executable, __file__, "--build-world", str(work / "world")], check=True,
                   env={**os.environ, **ENV})
    python = args.checkout.resolve() / ".venv" / "bin" / "python"
    command = [str(python), __file__, "--probe", str(work / "world"), "--work", str(work / "runs"), "--only",
               args.only] + (["--json", str(args.json.resolve())] if args.json else [])
    (work / "runs").mkdir()
    sys.exit(subprocess.run(command, cwd=args.checkout, env={**os.environ, **ENV,
                                                             "PYTHONPATH": str(args.checkout.resolve())}).returncode)


if __name__ == "__main__":
    main()
