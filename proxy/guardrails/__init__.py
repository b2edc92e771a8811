"""Guardrails (SPEC §11): PII and operator-pattern detection on the text that reaches the model
and on what comes back, which blocks, redacts or logs.

`detectors` finds and validates, `rules` compiles the configured guardrails per key and model,
`extract` says where the texts are in each client API, `redact` rewrites them, `stage` is the
request path's stage, `answers` the hooks on JSON answers and streams (`stream` the hold-back).
"""
