"""Hugging Face Hub round trip: stage an export with its model card, upload it, and the ``push`` CLI.

``altogether hub push RUN_DIR REPO_ID [private=true] [include_encoder=true] [dry_run=true]`` uploads a run's
export (``RUN_DIR/export``, or RUN_DIR itself when it is an export) with a generated ``README.md`` and the
run's evaluation files. The token comes from ``HF_TOKEN`` or ``hf auth login``; it is never printed.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from .cli import Command, run_action, run_cli, setting
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


LOCAL_DIR = "local-dir:"  # open_clip's prefix for a model folder


def public_name(value: str) -> str:
    """An absolute local path (``/home/me/data/ft.jsonl``, ``~/x``, ``C:\\x``, ``local-dir:/abs/clip``) as its
    last component (``ft.jsonl``, ``local-dir:clip``); anything else (Hub ids, relative paths) unchanged."""
    prefix = LOCAL_DIR if value.startswith(LOCAL_DIR) else ""
    path = value[len(prefix) :]
    windows = re.match(r"^[A-Za-z]:[\\/]", path) is not None
    if not (path.startswith(("/", "~")) or windows):
        return value
    name = (PureWindowsPath if windows else PurePosixPath)(path.rstrip("/\\")).name
    return prefix + name if name else value


def without_local_paths(value: Any) -> Any:
    """``value`` (JSON-like) with every string that is an absolute local path replaced by :func:`public_name`."""
    if isinstance(value, str):
        return public_name(value)
    if isinstance(value, dict):
        return {k: without_local_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [without_local_paths(v) for v in value]
    return value


def finish_folder(folder: str | Path, source_export: str | Path, *, repo_id: str | None = None,
                  publish: bool = False) -> Path:
    """Copy the source's evaluation files into an export folder and write its ``README.md`` model card.

    ``publish`` (a copy for the Hub): its ``altogether.json`` and card name files and folders without the
    absolute local paths the training machine had (:func:`without_local_paths`).
    """
    folder = Path(folder)
    if publish:
        meta = read_export_config(folder)
        public = without_local_paths(meta)
        if public != meta:
            atomic_write_text(folder / CONFIG_FILE, json.dumps(public, indent=2, default=str))
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
    """Write exactly what :func:`push_run` uploads into ``target``: the export, evaluation files, model card,
    naming files and folders without absolute local paths."""
    export = find_export(run_or_export)
    copy_export(export, target, include_encoder=include_encoder)
    return finish_folder(target, export, repo_id=repo_id, publish=True)


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


@dataclass
class PushSettings:
    private: bool = setting(False, "create the repo as private")
    include_encoder: bool = setting(False, "upload a copy of the frozen image encoder instead of only its open_clip "
                                           "reference")
    dry_run: bool = setting(False, "list what would be uploaded and the model card; upload nothing")
    message: str = setting(DEFAULT_COMMIT, "commit message")


def _push(paths: list[str], s: PushSettings) -> int:
    run_dir, repo_id = paths
    if s.dry_run:
        with tempfile.TemporaryDirectory(prefix="altogether-push-") as tmp:
            folder = stage_run(run_dir, Path(tmp) / "repo", repo_id=repo_id, include_encoder=s.include_encoder)
            for path in sorted(p for p in folder.rglob("*") if p.is_file()):
                print(f"{path.stat().st_size:>12,d}  {path.relative_to(folder)}")
            print((folder / "README.md").read_text())
        return 0
    try:
        url = push_run(run_dir, repo_id, private=s.private or None, include_encoder=s.include_encoder,
                       commit_message=s.message)
    except OSError as err:  # huggingface_hub's HTTP and connection errors
        if isinstance(err, FileNotFoundError):
            raise
        print(f"error: upload to {repo_id} failed: {err}", file=sys.stderr)
        return 1
    print(f"uploaded: {url}")
    return 0


ACTIONS = {
    "push": Command("upload a run's export to the Hugging Face Hub",
                    {"RUN_DIR": "training run directory (holding export/) or an export folder",
                     "REPO_ID": "Hub repo, e.g. you/altogether-opt1.3b"}, PushSettings, _push),
}


def main(argv: list[str]) -> int:
    """``altogether hub push RUN_DIR REPO_ID [key=value ...]``."""
    return run_action("altogether hub", argv, ACTIONS)


if __name__ == "__main__":
    sys.exit(run_cli(main))
