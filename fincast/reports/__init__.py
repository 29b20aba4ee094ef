"""Reports and figures (layer L3)."""
