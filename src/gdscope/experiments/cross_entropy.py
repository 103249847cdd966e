"""Placeholder: the cross_entropy experiment is being written."""
