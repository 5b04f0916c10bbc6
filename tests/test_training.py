import csv
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from safetensors.torch import load_file

from altogether import Recaptioner
from altogether.cli import run_cli
from altogether.data.datamodule import ResumableSampler, open_sources
from altogether.model import AltogetherModel
from altogether.tiny import tiny_model_overrides, web_images, write_metaclip_shards
from altogether.train import main as train_main
from altogether.training import TrainingDataError, fit, lr_factor

from .conftest import hub_rows, write_drawn_jsonl
from .ddp_run import SETTINGS, FirstStepGradients

ROOT = Path(__file__).resolve().parent.parent


def test_schedule_warms_up_then_cosines_to_min_ratio():
    f = lambda s: lr_factor(s, warmup_steps=10, max_steps=96, min_lr_ratio=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(53) == pytest.approx(0.55)
    assert f(96) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    # a finetune runs its own schedule: the mean factor over its 96 steps is far from zero
    assert sum(f(s) for s in range(96)) / 96 > 0.5


def _small(make_recipe, jsonl_data, out, **extra):
    return make_recipe("finetune_round3", {
        "output_dir": str(out), "data.format": "jsonl", "data.train": str(jsonl_data),
        "data.micro_batch_size": 2, "data.num_workers": 0, "optim.global_batch_size": 4,
        "optim.max_steps": 4, "optim.warmup_steps": 1, "trainer.checkpoint_every_n_steps": 2,
        "trainer.progress_bar": False, "trainer.logger": "csv", **extra})


def test_resume_from_a_checkpoint_continues_exactly(make_recipe, jsonl_data, tmp_path):
    straight = fit(_small(make_recipe, jsonl_data, tmp_path / "a"))
    checkpoint = tmp_path / "a" / "checkpoints" / "step000002.ckpt"
    assert checkpoint.is_file()
    resumed = fit(_small(make_recipe, jsonl_data, tmp_path / "b", resume=str(checkpoint)))
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
    ckpt = torch.load(checkpoint, weights_only=True)  # plain tensors and containers: safe to load
    assert not any(k.startswith("model.encoder.") for k in ckpt["state_dict"])


@pytest.fixture
def uneven_data(tmp_path) -> Path:
    """32 drawn images whose round3 captions run from 4 to about 60 tokens, so micro-batches hold very
    different numbers of caption tokens."""
    return write_drawn_jsonl(tmp_path / "uneven.jsonl", "uneven", 32, lambda i, colour, shape: {
        "alt": f"zorbit K-{i} for sale",
        "round3": " and ".join([f"a {colour} {shape} on a white background"] * [1, 7, 1, 2, 9, 1, 3, 1][i % 8])})


class MicroBatchTokens(FirstStepGradients):
    """Also keeps the caption-token count of each micro-batch of the first optimizer step."""

    def __init__(self):
        super().__init__()
        self.tokens: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.gradients is None:
            self.tokens.append(batch["num_tokens"])


def logged(run: Path, name: str = "train/loss") -> list[float]:
    """A metric's logged values, step by step, from the CSV logger."""
    with open(run / "logs" / "version_0" / "metrics.csv") as f:
        return [float(row[name]) for row in csv.DictReader(f) if row.get(name)]


def assert_same_gradients(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and len(a) > 10
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.parametrize("layout", [{"data.packing": False}, {"data.packing": True, "data.pack_tokens": 160}],
                         ids=["padded", "packed"])
def test_an_optimizer_steps_loss_is_the_token_mean_of_its_global_batch(make_recipe, uneven_data, tmp_path, layout):
    """4 accumulated micro-batches of 8 give the gradients (and the logged loss) of one batch of 32."""
    runs = {}
    for micro in (8, 32):
        out = tmp_path / f"micro{micro}"
        probe = MicroBatchTokens()
        fit(make_recipe("finetune_round3", {
            "output_dir": str(out), "data.format": "jsonl", "data.train": str(uneven_data), "data.num_workers": 0,
            "data.micro_batch_size": micro, "optim.global_batch_size": 32, "optim.max_steps": 1,
            "optim.warmup_steps": 0, "trainer.progress_bar": False, "trainer.log_every_n_steps": 1, **layout}),
            callbacks=[probe])
        runs[micro] = probe, logged(out)
    (split, split_loss), (whole, whole_loss) = runs[8], runs[32]
    assert len(split.tokens) == 4 and sum(split.tokens) == whole.tokens[0]
    assert max(split.tokens) > 1.3 * min(split.tokens)  # uneven: a mean of micro-batch means would differ
    assert_same_gradients(split.gradients, whole.gradients)
    assert split_loss == pytest.approx(whole_loss, rel=1e-5) and len(whole_loss) == 1


def test_ddp_on_two_cpu_processes(make_recipe, tiny_dirs, uneven_data, tmp_path):
    """2 ranks x 2 micro-batches of 2 give the gradients and the logged loss of 1 process x 4 micro-batches."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    grads = tmp_path / "ddp_gradients.safetensors"
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "ddp_run.py"), str(tiny_dirs[0]), str(tiny_dirs[1]),
                           str(uneven_data), str(tmp_path / "ddp"), str(grads)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = dict(l.split("=", 1) for l in done.stdout.splitlines() if "=" in l)
    assert lines["world_size"] == "2" and lines["steps"] == "3"
    assert (tmp_path / "ddp" / "export" / "model.safetensors").is_file()

    single = FirstStepGradients()
    flat = {f"{group}.{key}": value for group, settings in SETTINGS.items() for key, value in settings.items()}
    fit(make_recipe("finetune_round3", {**flat, "output_dir": str(tmp_path / "one"), "data.train": str(uneven_data),
                                        "trainer.devices": 1}), callbacks=[single])
    assert_same_gradients(load_file(grads), single.gradients)
    assert logged(tmp_path / "ddp") == pytest.approx(logged(tmp_path / "one"), rel=1e-5)


def _cli_args(tiny_dirs, settings: dict) -> list[str]:
    """``key=value`` arguments of ``python -m altogether.train`` for the tiny model plus ``settings``."""
    def flat(prefix, node):
        for key, value in node.items():
            if isinstance(value, dict) and key != "config":
                yield from flat(f"{prefix}{key}.", value)
            else:
                yield f"{prefix}{key}={json.dumps(value)}"

    return [*flat("", tiny_model_overrides(*tiny_dirs)), "init_from=null", "trainer.progress_bar=false",
            "data.num_workers=0", *(f"{k}={v}" for k, v in settings.items())]


def test_pretrain_trains_on_metaclip_shards(tiny_dirs, tmp_path):
    """MetaCLIP's own layout (uuid.jpeg + uuid.json with [source, text] pairs, <shard % 100>/<shard>.tar)."""
    write_metaclip_shards(tmp_path / "metaclip", web_images(12), shards=3)
    out = tmp_path / "pretrain"
    args = _cli_args(tiny_dirs, {"output_dir": out, "data.train": tmp_path / "metaclip" / "*" / "*.tar",
                                 "data.micro_batch_size": 2, "data.shuffle_buffer": 4, "optim.global_batch_size": 4,
                                 "optim.max_steps": 3, "optim.warmup_steps": 1, "trainer.log_every_n_steps": 1})
    assert run_cli(train_main, ["recipe=pretrain", *args]) == 0
    meta = json.loads((out / "export" / "altogether.json").read_text())
    assert meta["training"] == {"steps": 3, "skipped": 0, "truncated_captions": 0}
    # 3 logged steps, each over more caption tokens than its 4 EOS: the alt-texts were read and trained on
    assert len(logged(out)) == 3 and all(n > 4 for n in logged(out, "train/caption_tokens"))


def test_a_finetune_that_reads_no_image_fails_in_one_line_and_exports_nothing(tiny_dirs, jsonl_data, tmp_path,
                                                                             capsys):
    out = tmp_path / "run"
    args = _cli_args(tiny_dirs, {"output_dir": out, "data.format": "jsonl", "data.train": jsonl_data,
                                 "data.image_root": tmp_path / "wrong", "data.micro_batch_size": 2,
                                 "optim.global_batch_size": 4, "optim.max_steps": 4, "optim.warmup_steps": 1})
    assert run_cli(train_main, ["recipe=finetune_round3", *args]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: none of the 4 samples of optimizer step 0 could be read; check data.image_root "
                            f"(relative image paths are joined to {tmp_path / 'wrong'})")
    assert "data.image_key='img_path'" in error and f"image file not found: {tmp_path / 'wrong'}" in error
    assert not (out / "export").exists()


def test_too_many_skipped_samples_stop_the_run_and_fewer_are_counted(make_recipe, jsonl_data, tmp_path):
    settings = {"data.format": "jsonl", "data.train": str(jsonl_data), "data.micro_batch_size": 2,
                "data.num_workers": 0, "optim.global_batch_size": 4, "optim.max_steps": 2, "optim.warmup_steps": 1,
                "trainer.progress_bar": False}
    train, _ = open_sources(make_recipe("finetune_round3", settings))
    first = [train[i] for _, i in itertools.islice(ResumableSampler(len(train), seed=0), 8)]  # two steps' samples
    for record in first[:3] + first[4:5]:  # 3 of step 0's 4 samples, 1 of step 1's
        Path(record.image).unlink()
    with pytest.raises(TrainingDataError, match=r"^3 of the 4 training samples so far could not be used, more "
                                                r"than data\.max_skipped_fraction=0\.5; check data\.image_root"):
        fit(make_recipe("finetune_round3", {**settings, "output_dir": str(tmp_path / "a")}))
    assert not (tmp_path / "a" / "export").exists()
    export = fit(make_recipe("finetune_round3", {**settings, "output_dir": str(tmp_path / "b"),
                                                 "data.max_skipped_fraction": 0.8}))
    assert json.loads((export / "altogether.json").read_text())["training"] == {
        "steps": 2, "skipped": 4, "truncated_captions": 0}


def test_compile_compiles_the_decoder_that_training_runs(make_recipe, jsonl_data, tmp_path, monkeypatch):
    """``trainer.compile=true`` compiles, in place, the decoder module the loss calls (the backend is swapped for
    eager here: Inductor's compile time is minutes on this CPU); the export keeps the plain weight names."""
    compiled = []
    real = torch.compile

    def eager_compile(fn, *args, **kwargs):
        compiled.append(getattr(fn, "__self__", fn))
        return real(fn, *args, **{**kwargs, "backend": "eager"})

    monkeypatch.setattr(torch, "compile", eager_compile)
    export = fit(_small(make_recipe, jsonl_data, tmp_path / "c", **{"trainer.compile": True, "optim.max_steps": 2}))
    assert [type(m).__name__ for m in compiled] == ["OPTModel"]
    names = set(load_file(export / "model.safetensors"))
    assert names and not any("_orig_mod" in n for n in names)
    assert any(n.startswith("decoder.model.decoder.layers.0.") for n in names)


def _hub_decoder(make_recipe, jsonl_data, out, opt_folder, **extra):
    """A recipe whose decoder is the Hub-shaped OPT folder, given as users give it (``name_or_path``)."""
    return _small(make_recipe, jsonl_data, out, **{"model.decoder.config": None, "model.decoder.tokenizer": None,
                                                   "model.decoder.name_or_path": str(opt_folder), **extra})


class ModeRecorder(Callback):
    """``(phase, part, module.training)`` at every forward of the encoder, the mapper and each decoder layer.

    The phase is ``train`` (training_step), ``val`` (validation_step) or ``sample`` (sample captions).
    """

    def __init__(self):
        self.phase, self.seen = "train", set()

    def setup(self, trainer, pl_module, stage):
        model = pl_module.model
        parts = [("encoder", model.encoder.visual), ("mapper", model.mapper)]
        parts += [("decoder", m) for m in model.decoder.modules() if type(m).__name__ == "OPTDecoderLayer"]
        for part, module in parts:
            module.register_forward_pre_hook(lambda m, args, part=part: self.seen.add((self.phase, part, m.training)))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.phase = "train"

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.phase = "val"


@pytest.mark.parametrize("path", ["config", "pretrained", "init_from", "lora", "frozen"])
def test_trainable_modules_train_in_train_mode_and_evaluate_in_eval_mode(path, make_recipe, jsonl_data, opt_folder,
                                                                         tmp_path, monkeypatch):
    """On every way a run gets its model, dropout runs in each training step (decoder dropout 0.1 as OPT-1.3B's
    config) and not in validation or sample captions; the frozen encoder never trains, nor does a frozen decoder
    (ClipCap keeps its frozen language model in eval mode)."""
    extra = {"data.val_fraction": 0.25, "trainer.val_every_n_steps": 2, "trainer.sample_every_n_steps": 2,
             "trainer.num_sample_images": 1}
    if path == "config":  # the Hub's config.json given as model.decoder.config: random weights
        extra = {**extra, "model.decoder.config": json.loads((opt_folder / "config.json").read_text()),
                 "model.decoder.tokenizer": str(opt_folder)}
    if path == "init_from":
        extra["init_from"] = str(fit(_hub_decoder(make_recipe, jsonl_data, tmp_path / "first", opt_folder,
                                                  **{"optim.max_steps": 2})))
    if path in ("lora", "frozen"):
        extra["model.decoder.trainable"] = path
    recorder = ModeRecorder()
    real_generate = AltogetherModel.generate

    def generate(model, *args, **kwargs):
        phase, recorder.phase = recorder.phase, "sample"
        try:
            return real_generate(model, *args, **kwargs)
        finally:
            recorder.phase = phase

    monkeypatch.setattr(AltogetherModel, "generate", generate)
    cfg = _hub_decoder(make_recipe, jsonl_data, tmp_path / "run", opt_folder, **extra)
    fit(cfg, callbacks=[recorder])
    trains = path != "frozen"
    assert recorder.seen == {("train", "encoder", False), ("train", "mapper", True), ("train", "decoder", trains),
                             ("val", "encoder", False), ("val", "mapper", False), ("val", "decoder", False),
                             ("sample", "mapper", False), ("sample", "decoder", False)}


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_fp16_checkpoint_trains_with_fp32_master_weights(make_recipe, jsonl_data, opt_folder, tmp_path, precision):
    """OPT's config.json says float16 and transformers 5 loads that dtype unless told: training must still run,
    with fp32 weights, gradients and optimizer steps, under ``32-true`` (the CPU default) and ``bf16-mixed`` (the
    GPU default, whose autocast also runs on a CPU) with the recipe's gradient clipping; inference takes the dtype
    asked."""
    seen = set()

    class Dtypes(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            seen.update((p.dtype, p.grad.dtype) for g in optimizer.param_groups for p in g["params"])

    cfg = _hub_decoder(make_recipe, jsonl_data, tmp_path / "run", opt_folder,
                       **{"optim.max_steps": 2, "trainer.precision": precision})
    assert cfg.optim.grad_clip > 0
    export = fit(cfg, callbacks=[Dtypes()])
    assert seen == {(torch.float32, torch.float32)}
    assert {t.dtype for t in load_file(export / "model.safetensors").values()} == {torch.float32}
    for dtype, expected in ((None, torch.float32), ("bfloat16", torch.bfloat16)):
        captioner = Recaptioner.from_pretrained(export, device="cpu", dtype=dtype)
        trained = [captioner.model.mapper, captioner.model.decoder]
        assert {p.dtype for m in trained for p in m.parameters()} == {expected}


def test_decoder_larger_than_its_tokenizer_goes_through_every_stage(make_recipe, jsonl_data, opt_folder, tmp_path):
    """facebook/opt-1.3b has 50272 embedding rows and 50265 tokens: pretrain -> export -> Recaptioner -> init_from."""
    from .conftest import draw

    pretrain = fit(_hub_decoder(make_recipe, jsonl_data, tmp_path / "pretrain", opt_folder, **{"optim.max_steps": 2}))
    captioner = Recaptioner.from_pretrained(pretrain, device="cpu")
    rows = captioner.model.decoder.get_input_embeddings().num_embeddings
    assert rows == hub_rows(opt_folder) > len(captioner.tokenizer)
    stored = load_file(pretrain / "model.safetensors")
    weights = "decoder.lm_head.weight" if "decoder.lm_head.weight" in stored else "decoder.model.decoder.embed_tokens.weight"
    assert torch.equal(captioner.model.decoder.get_input_embeddings().weight, stored[weights])
    [caption] = captioner.recaption([draw("red", "square")], ["zorbit K-12 for sale"], do_sample=False,
                                    max_new_tokens=4)
    assert isinstance(caption, str)
    finetune = fit(_small(make_recipe, jsonl_data, tmp_path / "finetune", **{"init_from": str(pretrain),
                                                                            "optim.max_steps": 2}))
    assert Recaptioner.from_pretrained(finetune, device="cpu").model.decoder.get_input_embeddings().num_embeddings == rows


def _same_weights(a: Path, b: Path) -> None:
    left, right = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert left.keys() == right.keys()
    for key in left:
        torch.testing.assert_close(left[key], right[key], rtol=0, atol=1e-6, msg=key)


def test_checkpoints_are_renamed_into_place_from_their_own_folder(make_recipe, jsonl_data, tmp_path, monkeypatch):
    """No checkpoint is staged on another filesystem (a copy, not a rename, that a kill leaves half done)."""
    renames = []
    real_replace = os.replace

    def replace(src, dst, **kwargs):
        renames.append((Path(src), Path(dst)))
        return real_replace(src, dst, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    fit(_small(make_recipe, jsonl_data, tmp_path / "run"))
    folder = tmp_path / "run" / "checkpoints"
    placed = sorted(dst.name for src, dst in renames if dst.parent == folder)
    assert placed == ["last.ckpt", "last.ckpt", "step000002.ckpt", "step000004.ckpt"]
    assert all(src.parent == dst.parent and src.name.startswith(f".{dst.name}.") for src, dst in renames
               if dst.parent == folder)
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt", "step000002.ckpt", "step000004.ckpt"]


def test_resume_skips_a_half_written_checkpoint_and_removes_staged_ones(make_recipe, jsonl_data, tmp_path, caplog):
    """A kill mid-write left last.ckpt (step 4) half written and a staged file: resume=true resumes from the newest
    checkpoint that loads (step 2), says which one it skipped, and ends where an uninterrupted run ends."""
    straight = fit(_small(make_recipe, jsonl_data, tmp_path / "a"))
    folder = tmp_path / "b" / "checkpoints"
    folder.mkdir(parents=True)
    (folder / "step000002.ckpt").write_bytes((tmp_path / "a" / "checkpoints" / "step000002.ckpt").read_bytes())
    whole = (tmp_path / "a" / "checkpoints" / "last.ckpt").read_bytes()
    (folder / "last.ckpt").write_bytes(whole[: len(whole) // 2])
    (folder / ".step000004.ckpt.k9x2.tmp").write_bytes(whole[:1000])
    with caplog.at_level("INFO", logger="altogether"):
        resumed = fit(_small(make_recipe, jsonl_data, tmp_path / "b", resume=True))
    _same_weights(straight, resumed)
    assert f"resume: skipped {folder / 'last.ckpt'}: it cannot be read as a checkpoint" in caplog.text
    assert f"resuming from {folder / 'step000002.ckpt'}" in caplog.text
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]


def test_resume_auto_starts_a_first_run_and_resume_true_needs_a_checkpoint(make_recipe, jsonl_data, tmp_path):
    with pytest.raises(FileNotFoundError, match="resume=true but there is no readable checkpoint in"):
        fit(_small(make_recipe, jsonl_data, tmp_path / "strict", resume=True))
    assert not (tmp_path / "strict" / "checkpoints").exists()
    export = fit(_small(make_recipe, jsonl_data, tmp_path / "auto", resume="auto", **{"optim.max_steps": 2}))
    assert json.loads((export / "altogether.json").read_text())["training"]["steps"] == 2


# Slows each micro-batch so that SIGTERM lands in the middle of training, then runs the training CLI.
_SLOW_TRAIN = """
import sys, time
from altogether import training
from altogether.cli import run_cli
from altogether.train import main
step = training.CaptionerModule.training_step
def slow(self, batch, batch_idx):
    time.sleep(0.3)
    return step(self, batch, batch_idx)
training.CaptionerModule.training_step = slow
sys.exit(run_cli(main, sys.argv[1:]))
"""


def test_sigterm_saves_a_checkpoint_exits_143_and_resume_auto_continues(tiny_dirs, jsonl_data, tmp_path):
    """What a scheduler does: SIGTERM mid-run. Training finishes the optimizer step in progress, saves last.ckpt,
    exports nothing and exits 143; the requeued command with resume=auto ends as an uninterrupted run does."""
    import signal
    import time

    settings = {"data.format": "jsonl", "data.train": jsonl_data, "data.micro_batch_size": 2,
                "optim.global_batch_size": 4, "optim.max_steps": 8, "optim.warmup_steps": 1,
                "trainer.checkpoint_every_n_steps": 2}
    args = ["recipe=finetune_round3", *_cli_args(tiny_dirs, {**settings, "output_dir": tmp_path / "run"})]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_TRAIN, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    first = tmp_path / "run" / "checkpoints" / "step000002.ckpt"
    try:
        deadline = time.monotonic() + 240
        while not first.exists():
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "training never reached its first checkpoint"
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err[-3000:]
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    step = torch.load(last, weights_only=True)["global_step"]
    assert 2 <= step < 8
    assert err.strip().splitlines()[-1] == (f"error: stopped by SIGTERM after optimizer step {step}; checkpoint saved "
                                            f"to {last}; run the same command with resume=auto to continue")
    assert not (tmp_path / "run" / "export").exists()

    assert run_cli(train_main, [*args, "resume=auto"]) == 0
    straight = ["recipe=finetune_round3", *_cli_args(tiny_dirs, {**settings, "output_dir": tmp_path / "straight"})]
    assert run_cli(train_main, straight) == 0
    _same_weights(tmp_path / "straight" / "export", tmp_path / "run" / "export")
    meta = json.loads((tmp_path / "run" / "export" / "altogether.json").read_text())
    assert meta["training"]["steps"] == 8


# The same slowed training CLI as a script file: Lightning's DDP launcher re-runs the script, with the same
# arguments and environment, for rank 1. Each rank writes its pid when it starts and the exit status its command
# returned, in the folder $MARKS.
_SLOW_TRAIN_RANKS = """
import os, sys
from pathlib import Path
marks = Path(os.environ["MARKS"])
rank = os.environ.get("LOCAL_RANK", "0")
(marks / f"pid{rank}").write_text(str(os.getpid()))
try:
""" + "".join("    " + line + "\n" for line in _SLOW_TRAIN.strip().splitlines()) + """
except SystemExit as done:
    (marks / f"exit{rank}").write_text(str(done.code))
    raise
"""


@pytest.mark.parametrize("signalled", ["launcher", "rank 1"])
def test_sigterm_under_ddp_stops_every_rank_with_143_and_resume_auto_continues(tiny_dirs, jsonl_data, tmp_path,
                                                                              signalled):
    """Two CPU processes (gloo). SIGTERM to the launching process (rank 0) or to the rank it started: every rank
    stops after the same optimizer step and exits 143, last.ckpt holds that step and loads; the requeued command
    with resume=auto ends as an uninterrupted two-process run does."""
    import signal
    import time

    script = tmp_path / "slow_train.py"
    script.write_text(_SLOW_TRAIN_RANKS)
    settings = {"data.format": "jsonl", "data.train": jsonl_data, "data.micro_batch_size": 2,
                "optim.global_batch_size": 4, "optim.max_steps": 8, "optim.warmup_steps": 1,
                "trainer.checkpoint_every_n_steps": 2, "trainer.accelerator": "cpu", "trainer.devices": 2,
                "trainer.strategy": "ddp"}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}

    def command(run: str, *extra: str) -> tuple[Path, list[str], dict[str, str]]:
        marks = tmp_path / f"marks-{run}-{len(extra)}"
        marks.mkdir()
        args = ["recipe=finetune_round3", *_cli_args(tiny_dirs, {**settings, "output_dir": tmp_path / run}), *extra]
        return marks, [sys.executable, str(script), *args], {**env, "MARKS": str(marks)}

    marks, argv, marked = command("run")
    proc = subprocess.Popen(argv, env=marked, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = tmp_path / "run" / "checkpoints" / "step000002.ckpt"
    try:
        deadline = time.monotonic() + 400
        while not (first.exists() and (marks / "pid1").exists()):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "training never reached its first checkpoint"
            time.sleep(0.1)
        target = proc.pid if signalled == "launcher" else int((marks / "pid1").read_text())
        os.kill(target, signal.SIGTERM)
        _, err = proc.communicate(timeout=300)
        while not (marks / "exit1").exists():  # rank 1 may still be tearing down when rank 0 has exited
            assert time.monotonic() < deadline + 300, "rank 1 never exited"
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err[-3000:]
    assert (marks / "exit0").read_text() == "143" and (marks / "exit1").read_text() == "143"
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    step = torch.load(last, weights_only=True)["global_step"]
    assert 2 <= step < 8
    assert f"error: stopped by SIGTERM after optimizer step {step}; checkpoint saved to {last}" in err
    assert not (tmp_path / "run" / "export").exists()

    for run, extra in (("run", ["resume=auto"]), ("straight", [])):
        _, argv, marked = command(run, *extra)
        done = subprocess.run(argv, env=marked, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    _same_weights(tmp_path / "straight" / "export", tmp_path / "run" / "export")
    meta = json.loads((tmp_path / "run" / "export" / "altogether.json").read_text())
    assert meta["training"]["steps"] == 8


def test_an_unreadable_validation_image_is_skipped_by_the_sample_captions(make_recipe, jsonl_data, tmp_path, caplog):
    rows = [json.loads(line) for line in jsonl_data.read_text().splitlines()]
    (jsonl_data.parent / rows[0]["img_path"]).write_bytes(b"not an image")
    val = tmp_path / "val.jsonl"
    val.write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    with caplog.at_level("INFO", logger="altogether"):
        fit(_small(make_recipe, jsonl_data, tmp_path / "run", **{
            "data.train": str(jsonl_data), "data.val": str(val), "trainer.val_every_n_steps": 2,
            "trainer.sample_every_n_steps": 2, "trainer.num_sample_images": 2, "data.max_skipped_fraction": 0.9}))
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert [(s["step"], s["key"]) for s in samples] == [(2, "r001"), (2, "r002"), (4, "r001"), (4, "r002")]
    assert "sample captions: skipped 1 unreadable validation record(s): " in caplog.text and "r000" in caplog.text


@pytest.mark.parametrize("setting, message", [
    ({"data.micro_batch_size": 0}, "error: key 'data.micro_batch_size': 0 must be >= 1"),
    ({"trainer.val_every_n_steps": 0}, "error: key 'trainer.val_every_n_steps': 0 must be >= 1"),
    ({"trainer.sample_every_n_steps": 0}, "error: key 'trainer.sample_every_n_steps': 0 must be >= 1"),
    ({"optim.betas": "[0.9]"}, "error: key 'optim.betas': [0.9] must be two numbers in [0, 1)"),
    ({"optim.lr": -1}, "error: key 'optim.lr': -1.0 must be > 0"),
    ({"optim.weight_decay": -0.1}, "error: key 'optim.weight_decay': -0.1 must be >= 0"),
    ({"data.num_workers": -1}, "error: key 'data.num_workers': -1 must be >= 0"),
    ({"trainer.devices": 0}, "error: key 'trainer.devices': 0 must be a count >= 1"),
    ({"layout.max_alt_tokens": -1}, "error: key 'layout.max_alt_tokens': -1 must be >= 0"),
    ({"trainer.accelerator": "gpu"}, "error: key 'trainer.accelerator': gpu but torch sees no CUDA GPU"),
    ({"output_dir": "FILE"}, "error: key 'output_dir': FILE is a file; give a folder for the run"),
    ({"trainer.precision": "fp7"}, "error: key 'trainer.precision': 'fp7' is not one of auto, "),
    ({"trainer.accelerator": "quantum"}, "error: key 'trainer.accelerator': 'quantum' is not one of auto, "),
    ({"trainer.logger": "tensorboard"}, "error: key 'trainer.logger': tensorboard needs the tensorboard package: "
                                        "pip install 'altogether[tensorboard]'"),
    ({"trainer.logger": "wandb"}, "error: key 'trainer.logger': wandb needs the wandb package: "
                                  "pip install 'altogether[wandb]'"),
])
def test_training_mistakes_are_one_line_and_exit_2(setting, message, tiny_dirs, jsonl_data, tmp_path, capsys,
                                                   monkeypatch):
    import importlib.util

    if "accelerator" in setting:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    if "trainer.logger" in setting:  # as on a machine without the extra, whatever this one has
        real = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in (
            "tensorboard", "tensorboardX", "wandb") else real(name, *a))
    afile = tmp_path / "a_file"
    afile.write_text("x")
    setting = {k: afile if v == "FILE" else v for k, v in setting.items()}
    message = message.replace("FILE", str(afile))
    settings = {"output_dir": tmp_path / "run", "data.format": "jsonl", "data.train": jsonl_data, **setting}
    assert run_cli(train_main, ["recipe=finetune_round3", *_cli_args(tiny_dirs, settings)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines()[-1].startswith(message) and "Traceback" not in err
    assert not (tmp_path / "run" / "export").exists()


def test_every_file_of_a_run_gets_the_umasks_permissions(tiny_dirs, jsonl_data, tmp_path):
    """Under umask 002 (a group-shared project folder) the export, its weights and the checkpoints are 0664 /
    0775 as everything else the run writes, not the private 0600 of a temporary file."""
    import stat

    out = tmp_path / "run"
    args = _cli_args(tiny_dirs, {"output_dir": out, "data.format": "jsonl", "data.train": jsonl_data,
                                 "data.micro_batch_size": 2, "optim.global_batch_size": 2, "optim.max_steps": 2,
                                 "optim.warmup_steps": 1, "trainer.checkpoint_every_n_steps": 1})
    before = os.umask(0o002)
    try:
        assert run_cli(train_main, ["recipe=finetune_round3", *args]) == 0
    finally:
        os.umask(before)
    written = [p for p in [out, *out.rglob("*")] if not p.name.startswith(".")]
    assert {"model.safetensors", "open_clip_model.safetensors", "step000002.ckpt", "last.ckpt"} <= {
        p.name for p in written}
    modes = {str(p.relative_to(out)): oct(stat.S_IMODE(p.stat().st_mode)) for p in written}
    assert modes == {name: "0o775" if (out / name).is_dir() else "0o664" for name in modes}


@pytest.mark.parametrize("line, byte", [(b'{"img_path": "images/003.png", "round3": "caf\xe9"}\n', "0xe9"),
                                        (b'{"key": "\xff", "img_path": "images/003.png", "round3": "x"}\n', "0xff")])
def test_a_training_jsonl_that_is_not_utf8_is_one_line_naming_the_file_and_line(line, byte, tiny_dirs, jsonl_data,
                                                                                  tmp_path, capsys):
    """Before training starts. pyarrow's JSON reader takes such lines into its string columns when every column
    has one type (a file of mixed types it refuses as it parses); the row's read then failed mid-training with
    Python's decoding error, which names neither file nor line."""
    rows = [json.loads(line) for line in jsonl_data.read_text().splitlines()]
    lines = [json.dumps({**row, "alt": row["alt"] if isinstance(row["alt"], str) else row["alt"][0]}).encode() + b"\n"
             for row in rows]
    broken = tmp_path / "latin1.jsonl"
    broken.write_bytes(b"".join(lines[:3]) + line + b"".join(lines[4:]))
    settings = {"output_dir": tmp_path / "run", "data.format": "jsonl", "data.train": broken,
                "data.image_root": jsonl_data.parent, "optim.max_steps": 2, "optim.warmup_steps": 1}
    assert run_cli(train_main, ["recipe=finetune_round3", *_cli_args(tiny_dirs, settings)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines()[-1].startswith(f"error: {broken} line 4: not UTF-8 text (byte {byte}")
    assert "Traceback" not in err and not (tmp_path / "run" / "export").exists()


@pytest.mark.parametrize("text, message", [
    ("recipe: broken\noptim: {lr: 1\n", "not valid YAML"),
    ("- recipe\n- optim\n", "expected a mapping of keys (recipe:, optim:, ...), got a list"),
    ("", "empty; a recipe sets at least its data and model"),
    ("# written later\n", "empty; a recipe sets at least its data and model"),
])
def test_a_recipe_file_that_is_not_a_mapping_is_one_line(text, message, tmp_path, capsys):
    path = tmp_path / "mine.yaml"
    path.write_text(text)
    assert run_cli(train_main, [f"recipe={path}", "dry_run=true"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and err.startswith(f"error: recipe {path}: {message}")


def test_tensorboard_logger_writes_its_events_and_the_csv_log(make_recipe, jsonl_data, tmp_path):
    """With the ``tensorboard`` extra installed (``uv sync --extra tensorboard``): both logs, the CSV one that
    ``plot`` and the report read in its usual place."""
    pytest.importorskip("tensorboard")
    fit(_small(make_recipe, jsonl_data, tmp_path / "run", **{"trainer.logger": "tensorboard",
                                                             "trainer.log_every_n_steps": 1}))
    assert len(logged(tmp_path / "run")) == 4
    assert list((tmp_path / "run" / "tensorboard" / "version_0").glob("events.out.tfevents.*"))
