"""Measuring predictions: metrics.json's metrics, and a trained model on its held-out splits."""
