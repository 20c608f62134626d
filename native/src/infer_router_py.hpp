// Python bindings of the native request path (server._native.InferRouter, InferChunk).
#pragma once

#include <nanobind/nanobind.h>

namespace tachyon {

namespace nb = nanobind;

// Adds the InferRouter and InferChunk classes to `m` (after GrpcFrontend).
void register_infer_router(nb::module_& m);

}  // namespace tachyon
