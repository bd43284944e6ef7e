"""A stand-in model for load tests of the service without a GPU: `python -m bonefrac.serve.synthetic [--gil-ms 1]
[--gpu-ms 3] [--port 8000] [--max-batch 16] [--max-wait-ms 10]` serves the real app around it.

Each call holds the interpreter lock for `gil_ms` (like an eager forward's Python dispatch), then waits
`gpu_ms` with the lock released (like the GPU computing), whatever the batch size: the regime where
micro-batching should pay. Probabilities are a fixed function of the image, so results can be checked.
"""

from __future__ import annotations

import argparse
import logging
import time

import numpy as np


class SyntheticPredictor:
    class_names = ["no_fracture", "fracture"]
    positive_index, threshold, version, device = 1, 0.5, "synthetic", "synthetic"

    def __init__(self, gil_ms: float = 1.0, gpu_ms: float = 3.0, size: int = 384):
        self.gil_s, self.gpu_s, self.size = gil_ms / 1000, gpu_ms / 1000, size

    def predict_arrays(self, images: list[np.ndarray]) -> np.ndarray:
        end = time.perf_counter() + self.gil_s
        while time.perf_counter() < end:  # pure Python: keeps the GIL
            pass
        time.sleep(self.gpu_s)
        pos = np.array([float(img.mean()) / 255 for img in images], np.float32)
        return np.stack([1 - pos, pos], 1)


def main(argv=None) -> None:
    import uvicorn

    from .app import create_app
    from .settings import Settings

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gil-ms", type=float, default=1.0)
    ap.add_argument("--gpu-ms", type=float, default=3.0)
    ap.add_argument("--size", type=int, default=384)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--max-batch", type=int)
    ap.add_argument("--max-wait-ms", type=float)
    ap.add_argument("--device", help="ignored (accepted so load tests can pass the same flags)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings.from_env(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms)
    app = create_app(settings, predictor=SyntheticPredictor(args.gil_ms, args.gpu_ms, args.size))
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    main()
