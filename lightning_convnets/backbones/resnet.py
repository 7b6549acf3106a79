"""Placeholder: this family arrives in its own commit."""
