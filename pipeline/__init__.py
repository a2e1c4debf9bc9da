"""Reproducible ablation of Keras Conv2D design choices on Kaggle image competitions.

Stages (one module each): fetch, prepare, train, sweep, report, submit.
Run them all with `dvc repro`, or one at a time with `ablate <stage>`.
"""

__version__ = "0.1.0"
