"""Built-in plugins. Each module registers itself through the same hooks as third-party plugins."""
