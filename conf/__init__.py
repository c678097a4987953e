"""Hydra configs for lstmlab-train; installed as the package lstmlab.conf."""
