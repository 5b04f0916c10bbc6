"""Two-process CPU DDP run (gloo), launched by tests/test_training.py in its own interpreter: Lightning's DDP
launcher re-runs the command line for the second rank, which must not be pytest."""

import sys

from altogether.config import load_recipe
from altogether.tiny import tiny_model_overrides
from altogether.training import fit


def main(encoder: str, tokenizer: str, data: str, out: str) -> None:
    overrides = tiny_model_overrides(encoder, tokenizer)
    overrides.update({"output_dir": out, "init_from": None,
                      "data": {"format": "jsonl", "train": data, "micro_batch_size": 2, "num_workers": 0},
                      "optim": {"global_batch_size": 8, "max_steps": 3, "warmup_steps": 1},
                      "trainer": {"accelerator": "cpu", "devices": 2, "strategy": "ddp", "progress_bar": False}})
    cfg = load_recipe("finetune_round3", overrides)
    export = fit(cfg)
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        import json

        meta = json.loads((export / "altogether.json").read_text())
        print(f"world_size={dist.get_world_size() if dist.is_initialized() else 1}")
        print(f"steps={meta['training']['steps']}")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:5])
