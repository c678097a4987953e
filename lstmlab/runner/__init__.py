"""The experiment runner: ``lstmlab-train`` and what it is made of (``pip install 'lstmlab[runner]'``).

``config`` (typed schemas, Hydra's ConfigStore), ``build`` (config → task, model, optimizer, in
one place), ``models`` (the sequence models it trains), ``tasks`` (the data), ``loggers`` and
``train`` (one readable ``train(cfg) -> dict``), and ``cli``, the console scripts. Only ``config``
and ``train`` import Hydra or OmegaConf; the library (``lstmlab``, ``lstmlab.kernels``) never
imports anything from here.
"""
