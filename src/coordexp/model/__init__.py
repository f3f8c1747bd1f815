"""Models: coord-token vocabularies, tiny offline VLMs, loading, and
what trainers need from a VLM."""
