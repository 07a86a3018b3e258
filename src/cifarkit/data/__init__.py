"""Images in: where the data comes from, and how it reaches the training device.

`sources` decodes a dataset once into a cached uint8 array, `datamodule` splits it (held-out
validation, folds) and serves it to Lightning in a resumable order, `augment` transforms batches on
the device. May import the contracts at the package root only.
"""
