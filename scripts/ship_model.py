"""Copy a checkpoint into a shippable directory with fp16 weights (halves the size; predictions load as fp32):

    python scripts/ship_model.py runs/fracatlas/lite2/best models/fracatlas_effnet_lite

Files in the target that are not the checkpoint's own (MODEL_CARD.md, data_split.csv, ...) are kept. The
shipped JSON keeps the trained checkpoint's `code_version` (the code that trained the model; "unknown" when it
has none) and records the code that shipped it as `shipped_with`.
"""

import argparse
import logging
import sys

import torch

from bonefrac import __version__, checkpoint
from bonefrac.cli import run_logged

log = logging.getLogger("ship_model")


def ship(checkpoint_dir: str, out: str) -> None:
    model, meta = checkpoint.load(checkpoint_dir)
    meta = {k: v for k, v in meta.items() if k != "format_version"}  # save writes the format it writes
    # save fills in code_version with the running code's only when meta has none: keep the trained one (or say it
    # is unknown), so a model shipped by newer code still tells which code trained it
    meta = {**meta, "code_version": meta.get("code_version", "unknown"), "shipped_with": __version__}
    checkpoint.save(out, model, {**meta, "weights_dtype": "float16"}, dtype=torch.float16,
                    seen=checkpoint.read_seen(checkpoint_dir), keep_other_files=True)
    log.info("wrote %s", out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("out")
    args = p.parse_args()
    return run_logged(ship, args.checkpoint, args.out)


if __name__ == "__main__":
    sys.exit(main())
