"""The gRPC transport (`headct.v1.HeadCT`, `proto/`): the servicer, its interceptors (API keys, request
ids, metrics) and the problem -> gRPC status mapping. Like `api.http`, it only translates; the work is
`api.inference.service.PredictionService.handle`."""
