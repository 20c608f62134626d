"""The gRPC front end (inference.GRPCInferenceService over grpc.aio)."""
