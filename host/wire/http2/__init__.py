"""HTTP/2 for a server, without I/O (RFC 9113, RFC 7541 through ``hpack``)."""
