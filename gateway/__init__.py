"""The OpenAI-compatible HTTP edge: validates REST requests, publishes them on the bus, relays
token chunks back as JSON or server-sent events. Stateless; knows nothing of models or torch."""
