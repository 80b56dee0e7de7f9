"""The run directory: every file name, the one run.json writer, atomic writes, predictions.csv.
The lowest layer: nothing here knows images, models or strategies."""
