// Allocation of numpy arrays from C++ without the numpy C API (no numpy headers at build time).
#pragma once

#include <nanobind/nanobind.h>

#include <cstddef>

namespace tachyon {

namespace nb = nanobind;

// Imports numpy and caches numpy.empty and numpy.uint8 for the life of the process (two
// intentionally leaked references, so nothing is released during interpreter shutdown). Call
// once, from the module initializer, where the import lock makes it race-free.
void init_numpy_alloc();

// A new, uninitialised, writable, C-contiguous 1-D uint8 numpy array of `size` elements; numpy
// owns its memory. Requires the GIL and a prior init_numpy_alloc().
nb::object new_uint8_array(std::size_t size);

}  // namespace tachyon
