"""Model versions: the `model_version` that /v1/predict, /ready, the audit log and error messages report.

    checkpoint_version("runs/a/best", meta)    # "tf_efficientnet_lite0@3f9c2a1b"
    file_version("m.onnx", meta, "+onnx-int8")  # "tf_efficientnet_lite0@77d0e4c5+onnx-int8"

A version is the architecture and 8 hex digits of a SHA-256 over the model's weights (the weights file, or the
whole exported file) and the saved fields that change its decisions (`DECISION_KEYS`: classes, preprocessing,
temperature, thresholds). Two seeds of one recipe, a retrained model and a calibrated copy therefore differ, and
the same files give the same version on every machine. Files are hashed once, when the model is loaded.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .io import file_sha256  # a 350 MB model costs about a second, once per load

DECISION_KEYS = ("arch", "class_names", "positive_index", "positive_class", "preprocess", "temperature",
                 "threshold", "operating_points")
DIGITS = 8  # 32 bits: enough to tell a site's models apart, short enough to read in a log line


def version(arch: str, content_digest: str, meta: dict, suffix: str = "") -> str:
    """`<arch>@<8 hex><suffix>` from a digest of the model's weights and the decision fields of `meta`."""
    decisions = json.dumps({k: meta.get(k) for k in DECISION_KEYS}, sort_keys=True, default=str)
    digest = hashlib.sha256(f"{content_digest}\n{decisions}".encode()).hexdigest()
    return f"{arch}@{digest[:DIGITS]}{suffix}"


def checkpoint_version(path: str | Path, meta: dict) -> str:
    """The version of a checkpoint directory: its weights file and its JSON's decision fields."""
    from .checkpoint import WEIGHTS_FILE

    return version(meta["arch"], file_sha256(Path(path) / WEIGHTS_FILE), meta)


def file_version(path: str | Path, meta: dict, suffix: str = "") -> str:
    """The version of an exported model file (ONNX, TorchScript): the whole file, which carries its metadata."""
    return version(meta["arch"], file_sha256(path), meta, suffix)


def module_version(model, meta: dict) -> str:
    """The version of a model built in memory rather than loaded from a file: a digest of its state dict."""
    import torch

    h = hashlib.sha256()
    for key, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu()
        if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16; float32 holds it exactly
            tensor = tensor.float()
        h.update(key.encode())
        h.update(tensor.contiguous().numpy().tobytes())
    return version(meta["arch"], h.hexdigest(), meta)


def ensemble_version(member_versions: list[str], member_archs: list[str], weights, meta: dict) -> str:
    """`<arch>+<arch>@<8 hex>`: a digest of the members' versions (in order), the ensemble's weights and its own
    saved decision fields (threshold, operating points), so refitting an ensemble changes its version."""
    content = json.dumps({"members": list(member_versions), "weights": [float(w) for w in weights]})
    return version("+".join(member_archs), content, meta)
