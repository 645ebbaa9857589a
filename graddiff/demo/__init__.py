"""The motivating bugs as library code, for ``graddiff demo`` and the examples' data.

``data`` makes an MNIST-shaped dataset without network access; ``scenarios`` holds compact
versions of the three user questions (models and training loops) that ``graddiff demo`` records
and compares. The readable, stand-alone versions live in the repository's ``examples/``.
"""
