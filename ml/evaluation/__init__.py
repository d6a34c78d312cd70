"""Evaluation without experts: downstream utility, distribution metrics, chance levels and the
confidence intervals (torch-free) the reports share."""
