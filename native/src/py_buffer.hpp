// RAII ownership of one buffer-protocol export (Py_buffer).
#pragma once

#include <nanobind/nanobind.h>

#include <cstddef>
#include <stdexcept>

namespace tachyon {

namespace nb = nanobind;

enum class Access { kRead, kWrite };

// Holds a C-contiguous export of a Python object for as long as it lives. The export keeps a
// strong reference to the exporter and pins its memory (a bytearray cannot be resized, a
// memoryview cannot be released), so the bytes stay valid while the GIL is released. Must be
// acquired and destroyed with the GIL held. Neither copyable nor movable: some exporters point
// Py_buffer fields into the struct itself, so it must never be relocated (keep many in a
// std::unique_ptr<BufferView[]>, never a growing std::vector).
class BufferView {
 public:
  // An empty view, to acquire() later.
  BufferView() = default;

  BufferView(PyObject* obj, Access access) { acquire(obj, access); }

  // Exports `obj` into this empty view; throws the exporter's Python error on failure.
  void acquire(PyObject* obj, Access access) {
    if (view_.obj != nullptr) {
      throw std::logic_error("BufferView::acquire on a view that is already held");
    }
    int flags = PyBUF_C_CONTIGUOUS;
    if (access == Access::kWrite) {
      flags |= PyBUF_WRITABLE;
    }
    if (PyObject_GetBuffer(obj, &view_, flags) != 0) {
      view_ = Py_buffer{};
      throw nb::python_error();
    }
  }

  ~BufferView() {
    if (view_.obj != nullptr) {
      PyBuffer_Release(&view_);
    }
  }

  BufferView(const BufferView&) = delete;
  BufferView& operator=(const BufferView&) = delete;
  BufferView(BufferView&&) = delete;
  BufferView& operator=(BufferView&&) = delete;

  const unsigned char* data() const { return static_cast<const unsigned char*>(view_.buf); }
  unsigned char* mutable_data() const { return static_cast<unsigned char*>(view_.buf); }
  std::size_t size() const { return static_cast<std::size_t>(view_.len); }
  // The export itself (ndim, shape, itemsize), valid while the view is held.
  const Py_buffer& raw() const { return view_; }

 private:
  Py_buffer view_{};
};

}  // namespace tachyon
