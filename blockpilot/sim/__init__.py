"""Synthetic driving scenes and writers in real dataset formats."""
