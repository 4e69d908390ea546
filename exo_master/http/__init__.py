"""The master's HTTP side: the API app, its fast path, OpenAI formats, auth, bounds, errors, metrics."""
