"""The REST transport: FastAPI routers (`routers/`), the per-request ASGI middleware (request id, metrics,
access line) and the dependencies that hand the app's objects to routes. It only translates HTTP in and
answers or problems out; the work is `api.inference.service.PredictionService.handle`."""
