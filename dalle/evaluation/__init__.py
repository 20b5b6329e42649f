"""Evaluation: programs that judge generated images (the shapes judge) and score models."""
