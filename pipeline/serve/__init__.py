"""`pipeline serve`: a run's stages behind an OpenAI-compatible API (app.py, models.py), and a page
comparing two of them (static/index.html)."""
