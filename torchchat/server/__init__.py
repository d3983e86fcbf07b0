"""The OpenAI-compatible HTTP server: app (routes), schemas, engine (owns the model), protocol."""
