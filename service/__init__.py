"""The FastAPI gateway: ``app.create_app()`` builds it; nothing is loaded at import time."""
