"""The demo recipe's whole path, scaled down to seconds: CLIP -> tokenizer -> pretrain -> finetune -> table."""

import json

import yaml

from altogether.config import load_recipe
from altogether.demo.recipe import CONDITIONS, run_demo
from altogether.demo.score import METRICS


def test_scaled_down_demo_runs_every_stage_and_writes_the_table(tmp_path, capsys):
    cfg = load_recipe("demo", {
        "output_dir": str(tmp_path / "demo"),
        "demo": {"train_scenes": 64, "val_scenes": 4, "eval_scenes": 8, "clip_scenes": 256, "clip_steps": 2,
                 "clip_batch_size": 32, "pretrain_steps": 2, "pretrain_warmup_steps": 1, "tokenizer_vocab": 300},
        "optim": {"max_steps": 3, "warmup_steps": 1},
        "trainer": {"progress_bar": False, "sample_every_n_steps": 2},
    })
    results = run_demo(cfg)
    run = tmp_path / "demo"
    saved = json.loads((run / "demo_eval.json").read_text())
    assert saved == results and list(saved) == list(CONDITIONS)
    assert all(set(saved[c]) == set(METRICS) for c in CONDITIONS)
    values = [v for c in CONDITIONS for v in saved[c].values() if v is not None]
    assert values and all(0.0 <= v <= 1.0 for v in values)
    assert saved["w/o alt"]["name_carry_over"] is None  # no name in the prompt: not eligible
    for stage in ("clip", "tokenizer", "pretrain/export", "finetune/export"):
        assert (run / stage).is_dir(), stage
    finetune = yaml.safe_load((run / "finetune" / "config.yaml").read_text())
    assert finetune["init_from"].endswith("pretrain/export")  # finetune starts from the pretrain stage's export
    # The frozen encoder is the demo's CLIP: init_from runs load it from the pretrain export, which names its source.
    source = json.loads((run / "finetune" / "export" / "altogether.json").read_text())["encoder_source"]
    assert source["name"].endswith("/clip")
    table = (run / "demo_eval.md").read_text()
    assert "| w/ wrong-colour alt |" in table and "| w/ alt |" in capsys.readouterr().out
