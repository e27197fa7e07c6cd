"""train-sprm: feature collection from the engine, the SPR loss, head training and its report.

Only `loss`, `train` and `pipeline` need torch (the `[train]` extra); `metrics` and `collect` do not.
"""
