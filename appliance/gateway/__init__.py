"""What happens around the model call: API keys and scopes (later: limits, cache, usage)."""
