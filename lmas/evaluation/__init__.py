"""Evaluation: the task scorers, the population scorer and the evaluation schedule."""
