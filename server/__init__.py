"""OpenAI-compatible HTTP server for Ovis2: `create_app(settings, engine=None)`; CLI in `server.__main__`."""
