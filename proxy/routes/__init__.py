"""HTTP routes, one module per area of CONTRACT Part B."""
