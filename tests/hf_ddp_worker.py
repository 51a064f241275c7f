"""Worker of tests/test_integration_transformers.py's data-parallel test (run under torch.distributed.run): the
distillation Trainer run of that test, per-device batch 2, writing the logged losses and the student from rank 0."""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import test_integration_transformers as t  # noqa: E402


def main(out):
    student, losses, trainer = t.train(Path(out), batch_size=2, accumulation=1, ddp_backend="gloo")
    if trainer.is_world_process_zero():
        (Path(out) / "losses.json").write_text(json.dumps(losses))
        torch.save(student.state_dict(), Path(out) / "student.pt")
    # The Trainer leaves its gloo process group alive; torn down at interpreter exit instead, its threads sometimes
    # abort a rank ("terminate called without an active exception", 1 run in 10 here).
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
