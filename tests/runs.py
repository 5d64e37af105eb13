"""Reading what a training run wrote, for the tests that drive `diffax train` in subprocesses."""
import json
import os


def losses(workdir) -> dict[int, float]:
    """step -> logged loss from metrics.jsonl (the last line for a step wins)."""
    out = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            out[row["step"]] = row["loss"]
    return out
