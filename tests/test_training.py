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
from altogether.model import AltogetherModel
from altogether.training import fit, lr_factor

from .conftest import hub_rows

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


def test_ddp_on_two_cpu_processes(tiny_dirs, jsonl_data, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "ddp_run.py"), str(tiny_dirs[0]), str(tiny_dirs[1]),
                           str(jsonl_data), str(tmp_path / "ddp")], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = dict(l.split("=", 1) for l in done.stdout.splitlines() if "=" in l)
    assert lines["world_size"] == "2" and lines["steps"] == "3"
    assert (tmp_path / "ddp" / "export" / "model.safetensors").is_file()


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


def test_fp16_checkpoint_trains_with_fp32_master_weights(make_recipe, jsonl_data, opt_folder, tmp_path):
    """OPT's config.json says float16 and transformers 5 loads that dtype unless told: training on CPU
    (``32-true``) must still run, with fp32 weights, gradients and optimizer steps; inference takes the dtype asked."""
    seen = set()

    class Dtypes(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            seen.update((p.dtype, p.grad.dtype) for g in optimizer.param_groups for p in g["params"])

    export = fit(_hub_decoder(make_recipe, jsonl_data, tmp_path / "run", opt_folder, **{"optim.max_steps": 2}),
                 callbacks=[Dtypes()])
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
