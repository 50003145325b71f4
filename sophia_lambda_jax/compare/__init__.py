"""The comparison harness behind `slj compare`: protocols (which runs), the runner (train
each run, restartable), tables (the papers' tables beside our measurements) and plots.

Needs the `train` extra (the model, data and training stack) and matplotlib.
"""
