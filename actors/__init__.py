"""See the module docstrings; this package is described in README.md."""
