"""Callbacks for training frameworks, each an optional extra imported only on use.

- ``graddiff.integrations.lightning.GraddiffCallback`` (``pip install graddiff[lightning]``)
- ``graddiff.integrations.transformers.GraddiffCallback`` (``pip install graddiff[transformers]``)

A plain ``with graddiff.trace(model, path):`` around ``trainer.fit(...)`` / ``trainer.train()``
records the same steps; the callbacks add the framework's step numbers, start and stop with
the run, and never raise into the trainer. Accelerate needs no callback (docs/integrations.md).
"""
