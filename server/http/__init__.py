"""The HTTP/REST front end (KServe v2 paths with Triton's extensions)."""
