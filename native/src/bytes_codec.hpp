// Python-facing KServe v2 / Triton BYTES serialization (wire format in bytes_wire.hpp).
#pragma once

#include <nanobind/nanobind.h>

#include <cstddef>
#include <cstdint>

namespace tachyon {

namespace nb = nanobind;

// Serializes a sequence of bytes-like / str elements (str as UTF-8); a numpy array is flattened
// in C order first.
nb::bytes encode_bytes(nb::handle items);

// Parses exactly `count` elements (count == -1: all the buffer holds, ending on a boundary).
nb::list decode_bytes(nb::handle buf, std::int64_t count);

// Number of elements in a well-formed buffer; ValueError as decode_bytes(buf, -1) otherwise.
std::size_t bytes_sizes(nb::handle buf);

}  // namespace tachyon
