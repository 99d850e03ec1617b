"""Cluster mode: the shared state backends (PostgreSQL, Redis) that replace the single box's
files when [cluster] database_url / redis_url are set. Imported only then, so a single box
never loads a Redis or PostgreSQL client."""
