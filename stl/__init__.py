"""stlflow.stl (see DESIGN.md)."""
