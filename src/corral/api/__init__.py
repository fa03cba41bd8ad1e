"""The REST API (FastAPI): the one door the CLI, the SDK and the web console use."""
