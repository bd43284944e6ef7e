"""Summarise `bonefrac predict` JSON lines against a labels CSV (the demo's view of the shipped model):

    python scripts/summarize_predictions.py predictions.jsonl data/sample/labels.csv [--label-col fractured]

The embedded sample lies in the shipped model's test split (see data/sample/README.md), so this is held-out.
"""

import argparse
import json
import logging
from pathlib import Path

import pandas as pd

from bonefrac.metrics import classification_metrics

log = logging.getLogger("summary")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("predictions")
    p.add_argument("labels")
    p.add_argument("--label-col", default="fractured")
    p.add_argument("--class-names", default="no_fracture,fracture")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    names = args.class_names.split(",")
    truth = pd.read_csv(args.labels)
    truth = dict(zip(truth.iloc[:, 0].map(lambda s: Path(s).name), truth[args.label_col].astype(int)))
    rows = [json.loads(line) for line in Path(args.predictions).read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("status", "ok") == "ok" and "prediction" in r and Path(r["path"]).name in truth]
    y = [truth[Path(r["path"]).name] for r in rows]
    probs = [[r["probabilities"][c] for c in names] for r in rows]
    pred = [names.index(r["prediction"]) for r in rows]
    import numpy as np

    m = classification_metrics(np.array(y), np.array(probs), names, positive_index=1)
    correct = sum(int(a == b) for a, b in zip(y, pred))
    log.info("shipped model on %d sample images (held out): %d correct by its own threshold; AUROC %.3f",
             len(rows), correct, m["auroc"])


if __name__ == "__main__":
    main()
