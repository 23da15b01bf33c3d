"""stlflow.envs (see DESIGN.md)."""
