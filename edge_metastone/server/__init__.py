"""The OpenAI-compatible HTTP server and the web page: a thin front over one `Reasoner`.

app.py (routes), schema.py (requests and response objects), service.py (the bounded queue and the
worker), streaming.py (server-sent events), errors.py (error types -> OpenAI error bodies),
runner.py (uvicorn with a drain), static/ (the page).
"""
