"""Task API endpoints for generation models (filled in by the generation work)."""

from __future__ import annotations

from typing import Any

ROUTES: list[Any] = []
