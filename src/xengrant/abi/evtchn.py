"""Placeholder: filled in by the ABI work."""
