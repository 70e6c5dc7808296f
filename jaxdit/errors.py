"""Exceptions every layer may raise, kept at the bottom of the import graph."""


class ConfigError(ValueError):
    """A config that cannot work (raised before anything expensive happens)."""
