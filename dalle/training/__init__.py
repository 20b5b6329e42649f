"""Training loops, one per component, and the shared state they checkpoint."""
