"""Scaling laws fitted to the runs of an MLflow experiment (issue 7).

`runs` reads an experiment into plain records, `laws` defines the laws, `fit` fits them with bootstrap intervals and
a held-out budget, `plot` draws the fit. Submodules are imported on use: this module stays cheap for the CLI.
"""
