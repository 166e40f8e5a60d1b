"""category-suggester: listing photos in, product-category suggestions out (Kafka + Triton)."""

__version__ = "0.1.0"
