"""The ``altogether`` console script: subcommands, one error path, and quiet logs on a real training run."""

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from altogether import cli

from .test_training import _cli_args

CONSOLE = Path(sys.executable).parent / "altogether"  # installed by [project.scripts]


def _run(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(CONSOLE), *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **env})


def test_help_lists_every_subcommand_on_one_line_each():
    done = _run("--help")
    assert done.returncode == 0, done.stderr
    listed = [line.split()[0] for line in done.stdout.splitlines() if line.startswith("  ")]
    assert listed == ["train", "demo", "recaption", "evaluate", "cache-embeddings", "annotate", "mix", "hub", "plot"]


def test_unknown_subcommand_is_one_line_and_exit_2(capsys):
    assert cli.main(["trian", "recipe=demo"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown subcommand 'trian'" in err and "train" in err


def test_no_subcommand_shows_usage_and_exits_2(capsys):
    assert cli.main([]) == 2
    assert "recaption" in capsys.readouterr().err


def test_user_mistake_is_one_line_exit_2_and_debug_shows_the_traceback(monkeypatch, capsys):
    assert cli.main(["train", "recipe=nope"]) == 2
    err = capsys.readouterr().err
    assert err == "error: unknown recipe 'nope'; valid recipes: demo, finetune_round2, finetune_round3, pretrain\n"
    monkeypatch.setenv("ALTOGETHER_DEBUG", "1")
    with pytest.raises(Exception, match="unknown recipe 'nope'"):
        cli.main(["train", "recipe=nope"])


def test_subcommands_reach_their_modules(capsys):
    """Each subcommand answers ``--help`` from its own module."""
    for name in cli.SUBCOMMANDS:
        code = cli.main([name, "--help"])
        out = capsys.readouterr().out
        assert code == 0 and "usage" in out, name


@pytest.mark.parametrize("argv", [
    ["mix", "a.recaption.jsonl", "--out", "x.parquet"],
    ["annotate", "next-round", "records.jsonl", "tasks.jsonl", "--vendors", "A,B"],
    ["hub", "push", "runs/r", "you/model", "--private"],
    ["plot", "runs/r", "--out", "c.png"],
])
def test_every_subcommand_takes_key_value_settings_not_flags(argv, capsys):
    """One grammar: a flag is a user mistake, one line naming it, exit 2, before any file is read."""
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    flag = next(arg for arg in argv if arg.startswith("--"))
    key = flag.removeprefix("--").replace("-", "_")
    assert err.count("\n") == 1 and f"settings are key=value, not flags ({flag}: write {key}=..." in err


def test_action_help_lists_settings_with_defaults_and_required_keys(capsys):
    assert cli.main(["annotate", "prefill", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: altogether annotate prefill MODEL RECORDS OUT [key=value ...]")
    assert "  batch_size=16 " in out and "  vendors=null " and "  swap=false " in out in out
    assert cli.main(["mix", "--help"]) == 0
    assert "  out=... (required) " in capsys.readouterr().out
    assert cli.main(["annotate"]) == 2 and "next-round" in capsys.readouterr().err
    assert cli.main(["annotate", "nope"]) == 2
    assert capsys.readouterr().err.startswith("error: altogether annotate: unknown action 'nope'; choose one of:")


def test_settings_are_type_checked_and_required_ones_named(tmp_path, capsys):
    assert cli.main(["mix", str(tmp_path / "a.recaption.jsonl")]) == 2
    assert capsys.readouterr().err == "error: key 'out' is required: add out=...\n"
    assert cli.main(["mix", str(tmp_path / "a.recaption.jsonl"), "out=x.parquet", "seed=abc"]) == 2
    assert capsys.readouterr().err.startswith("error: key 'seed': ")


def test_training_run_logs_each_line_once_and_no_advertisement(tiny_dirs, jsonl_data, tmp_path):
    """A tiny finetune through the console script: every INFO line once, no Lightning cloud-logger tip."""
    args = _cli_args(tiny_dirs, {"output_dir": tmp_path / "run", "data.format": "jsonl", "data.train": jsonl_data,
                                 "data.micro_batch_size": 2, "optim.global_batch_size": 4, "optim.max_steps": 2,
                                 "optim.warmup_steps": 1, "trainer.logger": "csv"})
    done = _run("train", "recipe=finetune_round3", *args)
    assert done.returncode == 0, done.stderr
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    print("\n".join(lines))
    assert not [line for line in lines if "litmodels" in line or "Tip:" in line]
    # Lightning's handler writes "INFO: text" where ours writes "text": the same line twice either way
    repeated = {line: n for line, n in Counter(line.removeprefix("INFO: ") for line in lines).items() if n > 1}
    assert not repeated
    assert any(line.startswith("export: ") for line in lines)
    assert any("Trainer.fit` stopped: `max_steps=2` reached" in line for line in lines)  # Lightning's lines stay
