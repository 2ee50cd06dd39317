"""odmt-components: ODMT building blocks for multi-modal sequential recommendation."""

__version__ = "0.1.0"
