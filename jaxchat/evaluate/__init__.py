"""Evaluation: bits per byte, CORE, chat evals and the report card."""
