"""failfirst: a chaos lab for a resilient order pipeline."""

__version__ = "0.1.0"
