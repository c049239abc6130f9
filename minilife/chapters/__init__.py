"""minilife.chapters: one runnable module per step of the lifecycle (``python -m minilife.chapters.<name>``)."""
