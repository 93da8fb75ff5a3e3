"""The GPU check's modules, one a concern, one a section; `bench/gpu_check.py` is the script that runs them, and its
docstring is the manual and the map of this package."""
