"""Tools that are not pipeline stages: `python -m tools.predict`, `tools.review`, `tools.search`."""
