"""A distill job for tests/test_distributed.py, run by each process of ``torchrun``.

Usage: ddp_run.py CONFIG_JSON [KILL_RANK KILL_STEP]

Trains with ``train_student`` on the DistillConfig fields in CONFIG_JSON and writes, beside
the run folder, ids-rank{r}.json: the (trajectory_id, segment) pairs of every batch rank r's
loader gave, in order. With KILL_RANK and KILL_STEP, that rank kills itself (SIGKILL) after
that step, as a crashed GPU process would die.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import ClassVar

import tsdfm.models.train.distill as distill
from tsdfm.models.data.trajectories import TrajectoryLoader


class RecordingLoader(TrajectoryLoader):
    """The real loader; every batch it gives is also recorded."""

    given: ClassVar[list[list[list[int]]]] = []

    def __iter__(self):
        for batch in super().__iter__():
            pairs = zip(batch.trajectory_id.tolist(), batch.segment.tolist(), strict=True)
            RecordingLoader.given.append([list(p) for p in pairs])
            yield batch


def main() -> None:
    fields = json.loads(sys.argv[1])
    kill = (int(sys.argv[2]), int(sys.argv[3])) if len(sys.argv) > 3 else None
    rank = int(os.environ.get("RANK", "0"))
    distill.TrajectoryLoader = RecordingLoader

    def progress(step: int, total: int, metrics: dict) -> None:
        if kill is not None and (rank, step) == kill:
            os.kill(os.getpid(), signal.SIGKILL)

    distill.train_student(distill.DistillConfig(**fields), progress=progress)
    out = Path(fields["out"])
    (out.parent / f"{out.name}-ids-rank{rank}.json").write_text(json.dumps(RecordingLoader.given))


if __name__ == "__main__":
    main()
