"""Running a network on images: engines on a device (torch, onnxruntime), the Predictor, model
bundles on disk, and cached embeddings."""
