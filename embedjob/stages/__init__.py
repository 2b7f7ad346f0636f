"""The stages of a job, one module or package each (read the package docstrings for what lives where)."""
