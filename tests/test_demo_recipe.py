"""The demo recipe's whole path, scaled down to seconds: CLIP -> tokenizer -> pretrain -> finetune -> table."""

import json
import random
import re

import yaml

from altogether import Recaptioner
from altogether.config import DecoderConfig, load_recipe
from altogether.demo.recipe import (CONDITIONS, FACT_CONDITIONS, copy_records, fresh_id_records, run_demo,
                                    scene_records)
from altogether.demo.score import METRICS, NOVEL_CARRY_OVER, TABLE_COLUMNS, caption_facts
from altogether.demo.world import COLOURS, any_shape_id, caption_for, fact_shape, has_novel_pair, make_scenes
from altogether.layout import training_pair
from altogether.model import load_tokenizer


def test_scaled_down_demo_runs_every_stage_and_writes_the_table(tmp_path, capsys):
    cfg = load_recipe("demo", {
        "output_dir": str(tmp_path / "demo"),
        "demo": {"train_scenes": 64, "val_scenes": 4, "eval_scenes": 8, "novel_scenes": 6, "clip_scenes": 256,
                 "clip_steps": 2, "clip_batch_size": 32, "pretrain_steps": 2, "pretrain_warmup_steps": 1},
        "optim": {"max_steps": 3, "warmup_steps": 1},
        "trainer": {"progress_bar": False, "sample_every_n_steps": 2},
    })
    results = run_demo(cfg)
    run = tmp_path / "demo"
    saved = json.loads((run / "demo_eval.json").read_text())
    assert saved == results and list(saved) == list(CONDITIONS)
    assert all(set(saved[c]) == set(TABLE_COLUMNS) for c in CONDITIONS)
    values = [v for c in CONDITIONS for v in saved[c].values() if v is not None]
    assert values and all(0.0 <= v <= 1.0 for v in values)
    assert saved["w/o alt"]["fact_carry_over"] is None  # no facts in the prompt: not eligible
    # Novel-generator scenes are captioned with their own facts in the prompt, and only then.
    for condition in CONDITIONS:
        assert (saved[condition][NOVEL_CARRY_OVER] is None) == (condition not in FACT_CONDITIONS)
    # Both evaluations went through the library's evaluate: its files, the world's scores among its metrics.
    held_out = json.loads((run / "finetune" / "metrics.json").read_text())
    novel = json.loads((run / "novel_eval" / "metrics.json").read_text())
    assert held_out["data"]["evaluated"] == 8 and novel["data"]["evaluated"] == 6
    assert {c: {k: saved[c][k] for k in METRICS} for c in CONDITIONS} == held_out["set_scores"]
    assert list(novel["set_scores"]) == list(FACT_CONDITIONS)
    assert all(saved[c][NOVEL_CARRY_OVER] == novel["set_scores"][c]["fact_carry_over"] for c in FACT_CONDITIONS)
    assert (run / "finetune" / "report.html").is_file() and (run / "novel_eval" / "captions.jsonl").is_file()
    for stage in ("clip", "tokenizer", "pretrain/export", "finetune/export"):
        assert (run / stage).is_dir(), stage
    # The world's own words are single tokens; a fact splits into its characters.
    tokenizer = load_tokenizer(DecoderConfig(tokenizer=str(run / "tokenizer")))
    assert tokenizer.tokenize("A photo of Pyxwen TJ349: a purple triangle.") == [
        "A", "Ġphoto", "Ġof", "Ġ", *"Pyxwen", "Ġ", *"TJ349", ":", "Ġa", "Ġpurple", "Ġtriangle", "."]
    finetune = yaml.safe_load((run / "finetune" / "config.yaml").read_text())
    assert finetune["init_from"].endswith("pretrain/export")  # finetune starts from the pretrain stage's export
    pretrain = yaml.safe_load((run / "pretrain" / "config.yaml").read_text())
    # Copy samples keep their prompt in the pretrain stage; captions are prompt-dropped in the finetune.
    assert pretrain["layout"]["prompt_dropout"] == 0.0 and finetune["layout"]["prompt_dropout"] == 0.5
    # Both decoder stages read the embeddings the frozen CLIP wrote once, of every training and validation image.
    assert pretrain["data"]["cache_dir"] == finetune["data"]["cache_dir"] == str(run / "embeddings")
    assert pretrain["data"]["use_cache"] and finetune["data"]["use_cache"]
    assert json.loads((run / "embeddings" / "cache.json").read_text())["records"] == 64 + 4
    # Each stage is a plain recipe: the demo's own settings stay in the demo's recipe.
    assert "demo" not in finetune and finetune["pipeline"] is None
    # The frozen encoder is the demo's CLIP: init_from runs load it from the pretrain export, which names its source.
    export = json.loads((run / "finetune" / "export" / "altogether.json").read_text())
    assert export["encoder_source"]["name"].endswith("/clip")
    # The mark where the prompt ends travels with the export: its captions are generated after it, as trained.
    assert export["layout"]["prompt_end"] == "\n" and pretrain["data"]["packing"] and finetune["data"]["packing"]
    captioner = Recaptioner.from_pretrained(run / "finetune" / "export")
    assert captioner.prompt_ids("Pyxwen TJ349")[-1] == tokenizer.convert_tokens_to_ids("Ċ")
    table = (run / "demo_eval.md").read_text()
    assert "| w/ wrong-colour alt |" in table and "carry-over (novel generator)" in table
    assert "| w/ alt |" in capsys.readouterr().out


def test_fresh_id_records_caption_the_same_images_with_fresh_ids():
    scenes = make_scenes(30, 5)
    own, fresh = scene_records(scenes, "train"), fresh_id_records(scenes, "train", seed=0)
    assert [r.key for r in fresh] == [r.key for r in own] and all(a.image is b.image for a, b in zip(own, fresh))
    for scene, record in zip(scenes, fresh):
        prompt = record.alt_texts[0]
        assert not any(fact in prompt for fact in scene.facts)
        facts = caption_facts(record.target)
        assert facts and all(f in prompt for f in facts) and not any(has_novel_pair(f) for f in facts)
        # The same picture: after the facts, the caption is the scene's own.
        assert record.target.split(": ", 1)[1] == scene.caption.split(": ", 1)[1]
        assert record.target_without_alt == caption_for(scene, with_facts=False)


def test_copy_records_ask_to_reproduce_a_fresh_alt_text():
    scenes = make_scenes(40, 3)
    copies = copy_records(scenes, "train", 100, seed=0)
    assert len(copies) == 100 and copies == copy_records(scenes, "train", 100, seed=0)  # seeded
    rng = random.Random(0)
    for i, record in enumerate(copies):
        scene = scenes[i % 40]
        prompt, target = training_pair(record.alt_texts, record.target, task="finetune", prompt_dropout=0.0, rng=rng)
        assert target == prompt and record.image is scene.image
        # The scene's key: one embedding cache serves the copy and the caption samples of an image.
        assert record.key == f"train-{i % 40:05d}"
        # Fresh ids, never the scene's facts, and never a colour the image lacks.
        assert not any(fact in prompt for fact in scene.facts)
        lacking = set(COLOURS) - {colour for colour, _ in scene.objects}
        assert not lacking & set(re.findall(r"[a-z]+", prompt))
    assert len({r.alt_texts[0] for r in copies}) == 100


def test_copy_ids_have_no_shape_and_no_novel_pair():
    rng = random.Random(0)
    ids = [any_shape_id(rng) for _ in range(2000)]
    assert all(3 <= len(i) <= 26 and not has_novel_pair(i) for i in ids)
    shapes = {fact_shape(i) for i in ids}
    assert len(shapes) > 300  # no shape to learn: hundreds of them
    assert {c for i in ids for c in i if not c.isalnum()} == set(" -_./")
    digit_runs = {len(run) for i in ids for run in re.findall(r"[0-9]+", i)}
    assert {1, 2, 3, 4, 5, 6} <= digit_runs  # runs of any length (two parts may join without a separator)
    # Most ids keep one separator between all their parts: names of three or four words joined by spaces.
    multi = [re.findall(r"[^A-Za-z0-9]", i) for i in ids if len(re.findall(r"[^A-Za-z0-9]", i)) >= 2]
    same = sum(len(set(gaps)) == 1 for gaps in multi) / len(multi)
    assert 0.6 < same < 0.9 and sum(i.count(" ") >= 2 for i in ids) > 60
