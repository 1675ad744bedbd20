"""gRPC over HTTP/2 on top of ``..http2`` (grpc/doc/PROTOCOL-HTTP2.md)."""
