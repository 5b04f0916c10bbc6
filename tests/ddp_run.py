"""Two-process CPU DDP run (gloo), launched by tests/test_training.py in its own interpreter: Lightning's DDP
launcher re-runs the command line for the second rank, which must not be pytest.

``python tests/ddp_run.py ENCODER TOKENIZER DATA OUT [GRADIENTS]``: 3 optimizer steps of 8 samples (micro-batches
of 2 on each of 2 ranks); with GRADIENTS, rank 0 saves the first step's gradients there (safetensors). Logs every step."""

import sys

from lightning.pytorch.callbacks import Callback

from altogether.config import load_recipe
from altogether.tiny import tiny_model_overrides
from altogether.training import fit

SETTINGS = {"data": {"format": "jsonl", "micro_batch_size": 2, "num_workers": 0},
            "optim": {"global_batch_size": 8, "max_steps": 3, "warmup_steps": 1},
            "trainer": {"accelerator": "cpu", "progress_bar": False, "log_every_n_steps": 1}}


class FirstStepGradients(Callback):
    """Keeps the gradients of the first optimizer step, as the optimizer gets them (before clipping); rank 0
    saves them to ``path`` (safetensors) when given."""

    def __init__(self, path: str | None = None):
        self.path, self.gradients = path, None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.gradients is not None:
            return
        self.gradients = {name: p.grad.detach().clone() for name, p in pl_module.model.named_parameters()
                          if p.grad is not None}
        if self.path and trainer.is_global_zero:
            from safetensors.torch import save_file

            save_file(self.gradients, self.path)


def main(encoder: str, tokenizer: str, data: str, out: str, gradients: str | None = None) -> None:
    overrides = tiny_model_overrides(encoder, tokenizer)
    overrides.update({"output_dir": out, "init_from": None, **SETTINGS})
    overrides["data"] = {**SETTINGS["data"], "train": data}
    overrides["trainer"] = {**SETTINGS["trainer"], "devices": 2, "strategy": "ddp"}
    cfg = load_recipe("finetune_round3", overrides)
    export = fit(cfg, callbacks=[FirstStepGradients(gradients)])
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        import json

        meta = json.loads((export / "altogether.json").read_text())
        print(f"world_size={dist.get_world_size() if dist.is_initialized() else 1}")
        print(f"steps={meta['training']['steps']}")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:6])
