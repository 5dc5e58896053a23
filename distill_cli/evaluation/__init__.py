"""Evaluation: metrics, plots, export, and the report aggregated over a run's jobs.

    distill-cli eval run=demo          # metrics and plots (the eval stage: ``eval_stage``)
    distill-cli export run=demo tag=distill format=onnx
    distill-cli report run=demo        # report.md and report.csv from the run's folders

``metrics`` and ``plots`` take logits and histories, ``export`` writes a deployable file and its
card, ``aggregate`` groups a run's jobs into configurations and ``report`` prints them.
"""
