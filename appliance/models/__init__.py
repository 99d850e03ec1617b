"""Exported models: the manifest that describes one, and the registry that serves them."""
