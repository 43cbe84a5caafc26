"""IM Relay: IM providers' server APIs → one event schema → journal → Kafka, webhooks, files."""

__version__ = "0.1.0"

__all__ = ["__version__"]
