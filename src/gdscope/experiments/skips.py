"""Placeholder: the skips experiment is being written."""
