"""tailorlm: customize a language model end to end on one Ray cluster."""

__version__ = "0.1.0"
