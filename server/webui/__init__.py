"""The built-in chat page: static files served at `/` (see routes.py)."""
