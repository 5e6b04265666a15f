"""Hyper-parameter search for keras-ee (keras-tuner): `python -m tuning.search`."""
