// Batch assembly and disassembly for fixed-size tensors: many request buffers <-> one batch.
#pragma once

#include <nanobind/nanobind.h>

#include <cstddef>

namespace tachyon {

namespace nb = nanobind;

// Concatenates the bytes of C-contiguous buffers into one new 1-D uint8 numpy array (allocated
// by numpy, which owns it). Requires init_numpy_alloc() to have run.
nb::object gather(nb::handle parts);

// Concatenates the bytes of C-contiguous buffers into the writable buffer `out`; returns the
// number of bytes written. ValueError when `out` is too small.
std::size_t gather_into(nb::handle parts, nb::handle out);

// Splits the buffer `batch` into consecutive bytes objects of the given sizes.
nb::list scatter(nb::handle batch, nb::handle sizes);

}  // namespace tachyon
