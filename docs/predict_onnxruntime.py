"""Classify a picture of one digit with an exported .onnx file and no PyTorch: digit.py (numpy and
Pillow) puts the picture in MNIST's form, onnxruntime runs the model. A whole deployment is these
two files and `pip install onnxruntime numpy pillow`.

    python docs/predict_onnxruntime.py exports/bn_gap.onnx my-digit.jpg
"""
import os
import sys

import numpy as np
import onnxruntime as ort

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))   # digit.py
import digit  # noqa: E402

model, picture = sys.argv[1:3]
pixels = digit.to_mnist(digit.open_image(picture))   # uint8 [28, 28], white digit on black
x = (pixels.astype(np.float32) / 255)[None, None]     # the input contract: float32 [N, 1, 28, 28] in [0, 1];
session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])   # normalised inside the graph
log_probs = session.run(["log_probs"], {"image": x})[0][0]   # output: log-probabilities [N, 10]
probs = np.exp(log_probs)
print(f"{picture}: {probs.argmax()} ({100 * probs.max():.1f}%)")
