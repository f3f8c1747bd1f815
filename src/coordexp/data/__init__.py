"""Data: JSONL records, COCO conversion, synthetic scenes, CoordJSON rendering and collation."""
