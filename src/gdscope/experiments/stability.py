"""Placeholder: the stability experiment is being written."""
