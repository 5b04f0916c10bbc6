import subprocess
import sys

import pytest
import yaml

from altogether.config import ConfigError, accumulation_steps, available_recipes, load_recipe


def test_shipped_recipes_carry_table_10_values():
    assert {"pretrain", "finetune_round2", "finetune_round3"} <= set(available_recipes())
    for name in ("pretrain", "finetune_round2", "finetune_round3"):
        cfg = load_recipe(name)
        assert cfg.model.mapper.num_visual_tokens == 40
        assert (cfg.layout.max_alt_tokens, cfg.layout.max_caption_tokens) == (128, 256)
        assert (cfg.optim.lr, cfg.optim.min_lr_ratio, cfg.optim.global_batch_size) == (1e-3, 0.1, 512)
        g = cfg.generation
        assert (g.temperature, g.top_p, g.top_k, g.do_sample) == (0.2, 0.7, 0, True)
        assert cfg.model.encoder.name == "ViT-H-14-quickgelu" and cfg.model.encoder.pretrained == "metaclip_fullcc"
        assert cfg.model.encoder.resize_mode == "squash"  # the whole image, in training and inference alike
        assert cfg.model.decoder.name_or_path == "facebook/opt-1.3b"
    pre = load_recipe("pretrain")
    assert (pre.optim.max_steps, pre.optim.warmup_steps, pre.data.task) == (44000, 2000, "pretrain")
    for r in (2, 3):
        ft = load_recipe(f"finetune_round{r}")
        assert (ft.optim.max_steps, ft.data.target_key, ft.init_from) == (96, f"round{r}", "runs/pretrain/export")


@pytest.mark.parametrize("overrides, message", [
    (["optim.lrr=1"], "optim.lrr"),
    (["optim.lr=abc"], "optim.lr"),
    (["data.task=caption"], "data.task"),
    (["optim.warmup_steps=96"], "optim.warmup_steps"),
    (["layout.prompt_dropout=1.5"], "layout.prompt_dropout"),
    (["data.micro_batch_size=48"], "optim.global_batch_size"),
    (["model.decoder.trainable=half"], "model.decoder.trainable"),
    (["data.max_skipped_fraction=1.5"], "data.max_skipped_fraction"),
    (["data.alt_text_sources=[]"], "data.alt_text_sources"),
    (["model.encoder.resize_mode=shortest"], "model.encoder.resize_mode"),
])
def test_bad_overrides_fail_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_recipe("finetune_round3", overrides)


def test_unknown_recipe_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="unknown recipe 'nope'.*finetune_round3"):
        load_recipe("nope")


def test_accumulation_reaches_the_global_batch_exactly():
    cfg = load_recipe("pretrain", ["data.micro_batch_size=32"])
    assert accumulation_steps(cfg, 1) == 16 and accumulation_steps(cfg, 8) == 2 and accumulation_steps(cfg, 16) == 1
    with pytest.raises(ConfigError, match="cannot be reached"):
        accumulation_steps(cfg, 3)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "altogether.train", *args], capture_output=True, text=True,
                          timeout=120)


def test_cli_dry_run_prints_resolved_yaml_and_errors_are_one_line():
    done = _cli("recipe=finetune_round2", "dry_run=true", "optim.lr=2e-4", "output_dir=/tmp/x")
    assert done.returncode == 0, done.stderr
    printed = yaml.safe_load(done.stdout)
    assert printed["optim"]["lr"] == 2e-4 and printed["output_dir"] == "/tmp/x"
    assert printed["data"]["target_key"] == "round2"
    bad = _cli("recipe=finetune_round2", "optim.nope=1")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines() == ["error: key 'optim.nope': Key 'nope' not in 'OptimConfig'"]
    assert _cli("recipe=ghost").stderr.startswith("error: unknown recipe 'ghost'")


def test_a_recipe_names_the_pipeline_that_runs_it_and_gets_its_schema(tmp_path, monkeypatch):
    # The library's own recipes are run by `fit` and carry no plug-in's settings.
    plain = load_recipe("pretrain")
    assert plain.pipeline is None and "demo" not in plain
    # The demo recipe names its plug-in, whose schema adds the `demo:` block (its values from recipes/demo.yaml).
    demo = load_recipe("demo", ["demo.novel_scenes=7"])
    assert demo.pipeline == "demo" and demo.demo.novel_scenes == 7 and demo.demo.train_scenes == 8000
    with pytest.raises(ConfigError, match=r"demo\.nope"):
        load_recipe("demo", ["demo.nope=1"])
    with pytest.raises(ConfigError, match="key 'pipeline': set by the recipe file"):
        load_recipe("demo", ["pipeline=other"])
    with pytest.raises(ConfigError, match="demo"):  # another recipe cannot borrow a plug-in's block
        load_recipe("pretrain", ["demo.seed=1"])
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("pipeline: nowhere\n")
    with pytest.raises(ConfigError, match="key 'pipeline': no altogether.pipelines plug-in named 'nowhere'.*demo"):
        load_recipe(str(recipe))
