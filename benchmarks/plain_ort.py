"""The baseline certify is held to: open the ONNX file with onnxruntime, run the dataset's batches, write one CSV
row per sample (index, label, prediction). The same data reader as glorocert, nothing else.

    python benchmarks/plain_ort.py MODEL.onnx DATASET SPLIT OUT.csv
"""

import csv
import sys

import numpy as np
import onnxruntime as ort

from glorocert.data import open_dataset


def main(model: str, data: str, split: str, out: str) -> None:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    with open(out, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["index", "label", "predicted"])
        for batch in open_dataset(data, split=split).batches(256):
            logits = session.run(None, {name: np.ascontiguousarray(batch.x, dtype=np.float32)})[0]
            writer.writerows(zip(batch.index.tolist(), batch.y.tolist(), logits.argmax(axis=1).tolist()))


if __name__ == "__main__":
    main(*sys.argv[1:5])
