#include "bytes_list.hpp"

#include "gil.hpp"

#include <cstring>

namespace tachyon {

nb::list bytes_list(const unsigned char* base, const std::vector<Span>& spans,
                    std::size_t payload_bytes) {
  const auto n = static_cast<Py_ssize_t>(spans.size());
  nb::list out = nb::steal<nb::list>(PyList_New(n));
  if (!out.is_valid()) {
    throw nb::python_error();
  }
  if (!worth_releasing_gil(payload_bytes)) {
    // Small payload: one pass, each bytes object created with its contents.
    for (Py_ssize_t i = 0; i < n; ++i) {
      const Span& s = spans[static_cast<std::size_t>(i)];
      PyObject* item = PyBytes_FromStringAndSize(reinterpret_cast<const char*>(base + s.offset),
                                                 static_cast<Py_ssize_t>(s.size));
      if (item == nullptr) {
        throw nb::python_error();
      }
      PyList_SET_ITEM(out.ptr(), i, item);
    }
    return out;
  }
  // Large payload: allocate uninitialised bytes objects with the GIL, fill them without it.
  std::vector<unsigned char*> dests(spans.size(), nullptr);
  for (Py_ssize_t i = 0; i < n; ++i) {
    const Span& s = spans[static_cast<std::size_t>(i)];
    PyObject* item = PyBytes_FromStringAndSize(nullptr, static_cast<Py_ssize_t>(s.size));
    if (item == nullptr) {
      throw nb::python_error();
    }
    PyList_SET_ITEM(out.ptr(), i, item);
    dests[static_cast<std::size_t>(i)] = reinterpret_cast<unsigned char*>(PyBytes_AS_STRING(item));
  }
  {
    ReleaseGilIf nogil(true);
    for (std::size_t i = 0; i < spans.size(); ++i) {
      if (spans[i].size != 0) {  // size 0 is the shared empty bytes object: never written
        std::memcpy(dests[i], base + spans[i].offset, spans[i].size);
      }
    }
  }
  return out;
}

}  // namespace tachyon
