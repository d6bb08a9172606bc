"""The model runtime: the runner (its own threads, admission, batching), the runtimes (ONNX Runtime,
torch), decoding and preprocessing, and the ONNX export. Plain data in, plain data out: nothing
here knows HTTP, gRPC, sessions or the server's configuration."""
