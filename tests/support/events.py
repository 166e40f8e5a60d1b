"""Fixed sample events for the event contract's unit tests
(tests/unit/category_suggester/events)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import category_suggester
from category_suggester.events import CategorySuggestion, ListingImageUploaded

INPUT_TOPIC = "listing-image-uploaded"
OUTPUT_TOPIC = "category-suggestion"
SCHEMAS = Path(category_suggester.__file__).parent / "schemas"


def rabin64(data: bytes) -> int:
    """CRC-64-AVRO as the Avro specification defines it (independent of fastavro)."""
    empty = 0xC15D213AA4D7A795
    table = []
    for i in range(256):
        fp = i
        for _ in range(8):
            fp = (fp >> 1) ^ (empty & -(fp & 1))
        table.append(fp)
    fp = empty
    for byte in data:
        fp = (fp >> 8) ^ table[(fp ^ byte) & 0xFF]
    return fp


def uploaded(**changes: Any) -> ListingImageUploaded:
    """One fixed event (every field set); `changes` replace any of its values."""
    fields: dict[str, Any] = {
        "event_id": uuid.UUID("0b7f5d2c-4a57-4c1e-9a43-2f7f1d1d9e01"),
        "listing_id": "listing-42",
        "image_id": "image-7",
        "image_url": "https://images.example.com/42/7.jpg",
        "uploaded_at": datetime(2024, 5, 17, 9, 30, 15, 123000, tzinfo=UTC),
        "seller_id": "seller-9",
        "country": "PT",
    }
    fields.update(changes)
    return ListingImageUploaded(**fields)


def suggestion(**changes: Any) -> CategorySuggestion:
    """One fixed suggestion of five categories; `changes` replace any of its values."""
    fields: dict[str, Any] = {
        "event_id": uuid.UUID("5d0c1c3e-8f0a-4b55-8d8e-1f6e0b1a2c3d"),
        "source_event_id": uuid.UUID("0b7f5d2c-4a57-4c1e-9a43-2f7f1d1d9e01"),
        "listing_id": "listing-42",
        "image_id": "image-7",
        "category": "furniture",
        "score": 0.91,
        "scores": [
            {"category": "furniture", "score": 0.91},
            {"category": "books", "score": 0.05},
            {"category": "car", "score": 0.02},
            {"category": "mobile", "score": 0.015},
            {"category": "motorcycle", "score": 0.005},
        ],
        "confident": True,
        "confidence_threshold": 0.5,
        "model_name": "category_classifier",
        "model_version": "3",
        "timings": {"fetch_ms": 12.5, "preprocess_ms": 3.25, "inference_ms": 8.0, "total_ms": 40.0},
        "produced_at": datetime(2024, 5, 17, 9, 30, 15, 163000, tzinfo=UTC),
    }
    fields.update(changes)
    return CategorySuggestion(**fields)
