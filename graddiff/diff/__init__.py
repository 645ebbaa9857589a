"""The differ: align two runs and find where they diverge (work in progress)."""
