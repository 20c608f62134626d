// Python bindings of the native gRPC front end (server._native.GrpcFrontend).
#pragma once

#include <nanobind/nanobind.h>

#include <vector>

namespace tachyon {

namespace nb = nanobind;

// Adds the GrpcFrontend class to `m`.
void register_grpc_frontend(nb::module_& m);

namespace grpc {
struct ReadyItem;
}

// take()'s items as Python tuples: [(call_id, method, message, kind, metadata), ...].
nb::list ready_items_to_python(const std::vector<grpc::ReadyItem>& items);

}  // namespace tachyon
