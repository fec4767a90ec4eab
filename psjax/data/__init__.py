"""Evaluation and training data: Spec-Bench questions."""
