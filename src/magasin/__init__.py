"""magasin: an event-driven backend for a chain of retail stores."""

__version__ = "0.1.0"
