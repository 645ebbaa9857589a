"""graddiff.hooks: everything that touches torch's hook APIs while a trace is active.

This folder is the top-level ``hooks/`` of the repository and is installed as the package
``graddiff.hooks`` (``package_dir`` in setup.cfg). Use only relative imports inside it, so it
works under either name; the rest of graddiff imports it as ``graddiff.hooks``.

Data flow: model --torch hook APIs--> hooks --sink.record(kind, name, tensor)--> recorder.
"""
