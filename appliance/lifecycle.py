"""Process lifecycle shared by the server loop and the app: set when shutdown begins, so
/readyz turns 503 before the listener closes and in-flight work finishes."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Lifecycle:
    draining: bool = False
