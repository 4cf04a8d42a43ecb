"""Transports: stdio (with its parse guard) and Streamable HTTP (auth, metrics)."""
