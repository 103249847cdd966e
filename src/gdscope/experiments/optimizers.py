"""Placeholder: the optimizers experiment is being written."""
