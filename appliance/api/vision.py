"""Task API endpoints for vision models (filled in by the vision work)."""

from __future__ import annotations

from typing import Any

ROUTES: list[Any] = []
