"""Placeholder: the disparity experiment is being written."""
