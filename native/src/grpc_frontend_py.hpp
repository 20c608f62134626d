// Python bindings of the native gRPC front end (server._native.GrpcFrontend).
#pragma once

#include <nanobind/nanobind.h>

namespace tachyon {

namespace nb = nanobind;

// Adds the GrpcFrontend class to `m`.
void register_grpc_frontend(nb::module_& m);

}  // namespace tachyon
