"""Hugging Face Hub round trip: stage an export with its model card, upload it, and the ``push`` CLI.

``python -m altogether.hub push RUN_DIR REPO_ID [--private] [--include-encoder] [--dry-run]`` uploads a run's
export (``RUN_DIR/export``, or RUN_DIR itself when it is an export) with a generated ``README.md`` and the
run's evaluation files. The token comes from ``HF_TOKEN`` or ``hf auth login``; it is never printed.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from .cli import run_cli
from .export import CONFIG_FILE, ExportError, copy_export, read_export_config
from .io import atomic_write_text
from .model_card import render_card

log = logging.getLogger(__name__)

# Evaluation results a run may hold; they are shown in the card and uploaded with the weights.
EVAL_FILES = ("metrics.json",)
RUN_MARKER = "config.yaml"  # every training run directory holds its resolved config
DEFAULT_COMMIT = "Upload Altogether captioner"


def find_export(run_or_export: str | Path) -> Path:
    """The export folder of a run directory (``RUN/export``), or the folder itself when it is an export."""
    path = Path(run_or_export)
    for candidate in (path, path / "export"):
        if (candidate / CONFIG_FILE).is_file():
            return candidate
    raise ExportError(f"{path} is neither an export folder nor a run directory holding export/{CONFIG_FILE}")


def evaluation_files(export_dir: str | Path) -> dict[str, Path]:
    """Evaluation files in the export folder or, for ``RUN/export``, in the run directory (the export wins)."""
    export_dir = Path(export_dir)
    places = [export_dir]
    if (export_dir.parent / RUN_MARKER).is_file():
        places.append(export_dir.parent)
    found: dict[str, Path] = {}
    for place in places:
        for name in EVAL_FILES:
            if name not in found and (place / name).is_file():
                found[name] = place / name
    return found


def finish_folder(folder: str | Path, source_export: str | Path, *, repo_id: str | None = None) -> Path:
    """Copy the source's evaluation files into an export folder and write its ``README.md`` model card."""
    folder = Path(folder)
    evaluation: dict[str, Any] = {}
    for name, path in evaluation_files(source_export).items():
        try:
            evaluation[name] = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ExportError(f"{path}: invalid JSON: {err}") from None
        if path.resolve() != (folder / name).resolve():
            shutil.copy2(path, folder / name)
    card = render_card(read_export_config(folder), evaluation=evaluation, repo_id=repo_id, load_path=str(folder))
    atomic_write_text(folder / "README.md", card)
    return folder


def stage_run(run_or_export: str | Path, target: str | Path, *, repo_id: str | None = None,
              include_encoder: bool = False) -> Path:
    """Write exactly what :func:`push_run` uploads into ``target``: the export, evaluation files, model card."""
    export = find_export(run_or_export)
    copy_export(export, target, include_encoder=include_encoder)
    return finish_folder(target, export, repo_id=repo_id)


def upload_folder(folder: str | Path, repo_id: str, *, private: bool | None = None, token: str | None = None,
                  commit_message: str = DEFAULT_COMMIT) -> str:
    """Create the model repo if needed and upload ``folder`` as one commit; returns the repo URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    url = api.create_repo(repo_id, token=token, private=private, repo_type="model", exist_ok=True)
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file())
    log.info("uploading %d files to %s", len(files), repo_id)
    api.upload_folder(repo_id=repo_id, folder_path=str(folder), token=token, repo_type="model",
                      commit_message=commit_message)
    return str(url)


def push_run(run_or_export: str | Path, repo_id: str, *, private: bool | None = None, token: str | None = None,
             include_encoder: bool = False, commit_message: str = DEFAULT_COMMIT) -> str:
    """Upload a run's export with its model card and evaluation files; returns the repo URL."""
    with tempfile.TemporaryDirectory(prefix="altogether-push-") as tmp:
        folder = stage_run(run_or_export, Path(tmp) / "repo", repo_id=repo_id, include_encoder=include_encoder)
        return upload_folder(folder, repo_id, private=private, token=token, commit_message=commit_message)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m altogether.hub", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    push = sub.add_parser("push", help="upload a run's export to the Hugging Face Hub")
    push.add_argument("run_dir", help="training run directory (holding export/) or an export folder")
    push.add_argument("repo_id", help="Hub repo, e.g. you/altogether-opt1.3b")
    push.add_argument("--private", action="store_true", help="create the repo as private")
    push.add_argument("--include-encoder", action="store_true",
                      help="upload a copy of the frozen image encoder instead of only its open_clip reference")
    push.add_argument("--dry-run", action="store_true", help="list what would be uploaded and the model card; upload nothing")
    push.add_argument("--message", default=DEFAULT_COMMIT, help="commit message")
    return parser


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.dry_run:
        with tempfile.TemporaryDirectory(prefix="altogether-push-") as tmp:
            folder = stage_run(args.run_dir, Path(tmp) / "repo", repo_id=args.repo_id,
                               include_encoder=args.include_encoder)
            for path in sorted(p for p in folder.rglob("*") if p.is_file()):
                print(f"{path.stat().st_size:>12,d}  {path.relative_to(folder)}")
            print((folder / "README.md").read_text())
        return 0
    try:
        url = push_run(args.run_dir, args.repo_id, private=args.private or None,
                       include_encoder=args.include_encoder, commit_message=args.message)
    except OSError as err:  # huggingface_hub's HTTP and connection errors
        if isinstance(err, FileNotFoundError):
            raise
        print(f"error: upload to {args.repo_id} failed: {err}", file=sys.stderr)
        return 1
    print(f"uploaded: {url}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
