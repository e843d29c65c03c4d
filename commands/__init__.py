"""Command-line entry points, one module per role; nothing imports this package back."""
