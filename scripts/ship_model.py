"""Copy a checkpoint into a shippable directory with fp16 weights (halves the size; predictions load as fp32):

    python scripts/ship_model.py runs/fracatlas/lite2/best models/fracatlas_effnet_lite
"""

import argparse
import logging

import torch

from bonefrac import checkpoint


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("out")
    args = p.parse_args()
    model, meta = checkpoint.load(args.checkpoint)
    meta = {k: v for k, v in meta.items() if k not in ("format_version", "code_version")}
    checkpoint.save(args.out, model, {**meta, "weights_dtype": "float16"}, dtype=torch.float16,
                    seen=checkpoint.read_seen(args.checkpoint))
    logging.basicConfig(level=logging.INFO)
    logging.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
