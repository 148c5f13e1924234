"""From an uploaded scan to findings: admission (`admission`), spooling (`uploads`), the preprocessing
process pool (`workers`), micro-batching (`batching`), the inference backend seam (`backend`, with Triton
as `triton`), and the one orchestration both transports call (`service.PredictionService.handle`), whose
answer `answers` builds."""
