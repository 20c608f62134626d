// Read-only byte ranges borrowed from the elements of a Python sequence.
#pragma once

#include "py_buffer.hpp"
#include "spans.hpp"

#include <nanobind/nanobind.h>

#include <cstddef>
#include <memory>
#include <vector>

namespace tachyon {

namespace nb = nanobind;

// Whether `str` elements are accepted (as their UTF-8 encoding) or rejected with TypeError.
enum class StrPolicy { kReject, kUtf8 };

// Collects, in order, the bytes of every element of `seq` (any iterable). bytes elements are
// read directly, str elements (under StrPolicy::kUtf8) through their cached UTF-8 form, any
// other element through a C-contiguous buffer export, held until destruction. Keeps a private
// tuple of the elements, so nothing the caller or other Python code does to its own list can
// free an element while ranges() point into it. Construct and destroy with the GIL held;
// ranges() may be read without it. Nothing is kept once the object is destroyed.
class ByteSources {
 public:
  // `what` names the argument in error messages ("parts", "items").
  ByteSources(nb::handle seq, const char* what, StrPolicy strs);

  ByteSources(const ByteSources&) = delete;
  ByteSources& operator=(const ByteSources&) = delete;

  const std::vector<ByteRange>& ranges() const { return ranges_; }

  // Sum of all range sizes; never exceeds PY_SSIZE_T_MAX.
  std::size_t total_bytes() const { return total_; }

 private:
  nb::object items_;  // tuple of the elements
  // Exports of the non-bytes/str elements, allocated on the first one (most calls from the
  // gRPC path hold none); never reallocated, as a Py_buffer must not move (see BufferView).
  std::unique_ptr<BufferView[]> views_;
  std::size_t views_used_ = 0;
  std::vector<ByteRange> ranges_;
  std::size_t total_ = 0;
};

}  // namespace tachyon
