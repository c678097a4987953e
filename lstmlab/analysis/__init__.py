"""Analyses that read finished runs: ``lstmlab-report`` (``report``, with ``odyssey``),
``lstmlab-sample`` (``sample``), ``memory_report`` and ``probes``, ``forecast_report``.

They take their facts from the runs' own files and configs (``lstmlab.runner.build.rebuild``).
"""
