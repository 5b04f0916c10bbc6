"""The recaption CLI, made to stop for good in the middle of a shard, for tests/test_recaption.py's SIGKILL test.

``python tests/recaption_pause.py MARKER MODEL INPUT OUTPUT [key=value ...]``: once ``PAUSE_AFTER_SHARDS``
(default 1) shards are written and
the next shard already has captioned rows held in memory (not yet written), MARKER is created and the
process waits until it is killed (SIGKILL) or told to stop (SIGTERM). This makes "killed mid-shard" a deterministic point rather than a race.
"""

import os
import sys
from pathlib import Path

from altogether import recaption
from altogether.cli import run_cli

marker = Path(sys.argv.pop(1))
WRITTEN_FIRST = int(os.environ.get("PAUSE_AFTER_SHARDS", "1"))  # shards to write before pausing
finish_batch = recaption.ShardWriter.on_predict_batch_end


def finish_batch_then_pause(self, trainer, pl_module, outputs, batch, *args, **kwargs):
    finish_batch(self, trainer, pl_module, outputs, batch, *args, **kwargs)
    if len(self.stats.shards_written) >= WRITTEN_FIRST and self.rows:
        marker.write_text(f"written: {self.stats.shards_written}; in memory: {sorted(self.rows)}\n")
        self.stop.wait(600)  # SIGKILL ends it here; SIGTERM lets the run stop at the next batch boundary


recaption.ShardWriter.on_predict_batch_end = finish_batch_then_pause

if __name__ == "__main__":
    sys.exit(run_cli(recaption.main))
