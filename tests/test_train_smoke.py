import json
from pathlib import Path

from altogether.export import load_export
from altogether.training import fit


def test_short_cpu_run_exports_a_loadable_model(make_recipe, jsonl_data):
    cfg = make_recipe("finetune_round3", {
        "data.format": "jsonl", "data.train": str(jsonl_data), "data.val_fraction": 0.25,
        "data.micro_batch_size": 3, "data.num_workers": 0, "optim.global_batch_size": 6,
        "optim.max_steps": 4, "optim.warmup_steps": 1, "trainer.val_every_n_steps": 2,
        "trainer.checkpoint_every_n_steps": 2, "trainer.sample_every_n_steps": 2, "trainer.progress_bar": False,
    })
    export = fit(cfg)
    model, tok, transform, meta = load_export(export)
    assert meta["training"]["steps"] == 4
    run = Path(cfg.output_dir)
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert (run / "config.yaml").read_text().startswith("recipe: finetune_round3")
    samples = [json.loads(l) for l in (run / "samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == {2, 4}
