"""Placeholder: the width experiment is being written."""
