"""The use cases, transport-neutral: authentication, classify-and-record, preprocessing, history,
sessions and model versions. Every transport (handlers/: HTTP, the WebSocket stream, the Open
Inference Protocol over REST and gRPC) parses its own wire form, calls one of these, and maps the
domain errors (core.errors) in its one place. Nothing here imports Tornado or gRPC.
"""
