"""One training process for ``test_distributed.py``, started plainly or by torchrun.

``python ddp_worker.py SETTINGS.json DUMP_DIR [--no-dropout]`` trains with the settings
(``TrainConfig`` fields) and, after every step, writes ``DUMP_DIR/rank<R>.json``: the step
and a sha256 of this rank's parameters, so the test can check that the ranks agree.
``--no-dropout`` builds every dropout layer with p = 0: dropout masks depend on how a batch
is split over processes, so a comparison with a one-process run turns it off on both sides.
"""

import hashlib
import json
import os
import sys
from pathlib import Path

import torch

from zmdevice.config import TrainConfig
from zmdevice.errors import UserError
from zmdevice.training.run import run_train

PATHS = ("labeled", "unlabeled", "pseudo_labels", "test", "out")


def parameter_hash(module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(module.named_parameters()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def main() -> int:
    settings_file, dump = Path(sys.argv[1]), Path(sys.argv[2])
    if "--no-dropout" in sys.argv:
        build = torch.nn.Dropout.__init__
        torch.nn.Dropout.__init__ = lambda self, p=0.5, inplace=False: build(self, 0.0, inplace)
    values = json.loads(settings_file.read_text())
    values.update({key: Path(values[key]) for key in PATHS if values.get(key)})
    rank = int(os.environ.get("RANK", "0"))

    def on_step(setup, state, values):
        record = {"global_step": state["global_step"], "params": parameter_hash(setup.student)}
        (dump / f"rank{rank}.json").write_text(json.dumps(record))

    try:
        run_train(TrainConfig(**values), on_step=on_step)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
