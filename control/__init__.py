"""stlflow.control (see DESIGN.md)."""
