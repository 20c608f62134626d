// Building a Python list of bytes objects out of spans of one buffer.
#pragma once

#include "spans.hpp"

#include <nanobind/nanobind.h>

#include <cstddef>
#include <vector>

namespace tachyon {

namespace nb = nanobind;

// Returns [bytes(base[s.offset : s.offset + s.size]) for s in spans]. `payload_bytes` is the sum
// of the span sizes. The bytes objects are allocated with the GIL held; when the payload is
// large their contents are then copied with the GIL released. Must be called with the GIL held;
// `base` must stay valid and unresized for the whole call (hold a BufferView on it).
nb::list bytes_list(const unsigned char* base, const std::vector<Span>& spans,
                    std::size_t payload_bytes);

}  // namespace tachyon
