"""`sdxl train` (issue 5, being built): the objective's pure functions are in `objective.py`."""
