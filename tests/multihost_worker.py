"""`python -m safework.main ARGS`, recording the stream positions this process reads (the multi-host test).

Each position goes to `$SAFEWORK_READS_LOG.<process index>`, one per line, as the process reads it.
"""

import os
import sys

from absl import app

from safework import main
from safework.data import example


def _recording(index):
  def record(self, position):
    import jax
    with open(f"{os.environ['SAFEWORK_READS_LOG']}.{jax.process_index()}", "a") as f:
      f.write(f"{position}\n")
    return index(self, position)
  return record


if __name__ == "__main__":
  example.ShuffledStream.index = _recording(example.ShuffledStream.index)
  sys.argv[0] = "safework.main"
  app.run(main.main, flags_parser=main._parse_flags)
