"""stlflow.datasets (see DESIGN.md)."""
