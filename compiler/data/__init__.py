"""Data in: arrays (``.npz`` / ``.npy`` keyed by input name, checked against the model's
inputs; calibration batches) in ``arrays``, and image folders or list files with the
preprocessing recorded in the compiled model in ``images``."""
