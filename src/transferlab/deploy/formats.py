"""The formats `transferlab export --format` offers: name -> exporter(model_dir, out, **options)."""

from __future__ import annotations

from .coreml import export_coreml
from .export import export_onnx
from .openvino import export_openvino
from .tflite import export_tflite

EXPORT_FORMATS = {"onnx": export_onnx, "openvino": export_openvino, "tflite": export_tflite,
                  "coreml": export_coreml}
