"""stlflow.policy (see DESIGN.md)."""
