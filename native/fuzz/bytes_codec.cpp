// libFuzzer target: the BYTES codec's Python-facing functions (bytes_codec.cpp: decode_bytes,
// bytes_sizes, encode_bytes, with byte_sources.cpp and bytes_list.cpp under them), called
// directly on Python objects in an embedded interpreter.
//
// Input: 1 byte choosing the element count (0xff: all, 0xfe: an absurd count, else that many)
// and the kind of buffer (bytes, bytearray, a memoryview slice of a larger bytes), then the
// buffer. Checks, besides the sanitizers (the interpreter allocates with malloc, so ASan knows
// every object's bounds):
//   - decode either succeeds or raises ValueError, and agrees with bytes_sizes;
//   - what decodes re-encodes to exactly the buffer, from a list, a tuple and memoryviews;
//   - no call leaves a reference on the buffer or a Python error set.
#include "bytes_codec.hpp"

#include <nanobind/nanobind.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace nb = nanobind;

namespace {

void require(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "bytes_codec: %s\n", what);
    if (PyErr_Occurred() != nullptr) {
      PyErr_Print();
    }
    std::abort();
  }
}

bool equals(const nb::bytes& encoded, const char* data, std::size_t size) {
  return encoded.size() == size && (size == 0 || std::memcmp(encoded.c_str(), data, size) == 0);
}

// The buffer under test: `size` bytes at `data`, as bytes, bytearray or a memoryview slice.
nb::object make_buffer(int kind, const char* data, std::size_t size) {
  const auto n = static_cast<Py_ssize_t>(size);
  if (kind == 1) {
    return nb::steal(PyByteArray_FromStringAndSize(data, n));
  }
  if (kind == 2) {
    // Padding on both sides: an overread lands in readable bytes ASan cannot see, so the slice
    // bounds are what must hold. Checked by comparing results with the other kinds.
    nb::object padded = nb::steal(PyBytes_FromStringAndSize(nullptr, n + 8));
    char* p = PyBytes_AS_STRING(padded.ptr());
    std::memset(p, 0xAB, static_cast<std::size_t>(n) + 8);
    std::memcpy(p + 4, data, size);
    nb::object view = nb::steal(PyMemoryView_FromObject(padded.ptr()));
    nb::object slice = nb::steal(PySlice_New(nb::int_(4).ptr(), nb::int_(4 + n).ptr(), nullptr));
    return nb::steal(PyObject_GetItem(view.ptr(), slice.ptr()));
  }
  return nb::steal(PyBytes_FromStringAndSize(data, n));
}

void check(const char* data, std::size_t size, std::int64_t count, int kind) {
  nb::object buf = make_buffer(kind, data, size);
  require(buf.is_valid(), "could not make the buffer");
  const Py_ssize_t refs = Py_REFCNT(buf.ptr());
  bool decoded = false;
  try {
    nb::list items = tachyon::decode_bytes(buf, count);
    decoded = true;
    std::size_t payload = 0;
    for (nb::handle item : items) {
      require(PyBytes_CheckExact(item.ptr()), "an element is not bytes");
      payload += static_cast<std::size_t>(PyBytes_GET_SIZE(item.ptr()));
    }
    require(payload + 4 * items.size() == size, "elements do not add up to the buffer");
    require(count < 0 || items.size() == static_cast<std::size_t>(count), "wrong element count");
    require(tachyon::bytes_sizes(buf) == items.size(), "bytes_sizes disagrees with decode");

    require(equals(tachyon::encode_bytes(items), data, size), "list round trip differs");
    nb::object tuple = nb::steal(PySequence_Tuple(items.ptr()));
    require(equals(tachyon::encode_bytes(tuple), data, size), "tuple round trip differs");
    nb::list views = nb::steal<nb::list>(PyList_New(0));
    for (nb::handle item : items) {
      nb::object view = nb::steal(PyMemoryView_FromObject(item.ptr()));
      require(PyList_Append(views.ptr(), view.ptr()) == 0, "append");
    }
    require(equals(tachyon::encode_bytes(views), data, size), "memoryview round trip differs");
  } catch (const nb::builtin_exception& e) {
    require(e.type() == nb::exception_type::value_error, "an exception other than ValueError");
    require(!decoded, "encoding what decoded raised");
    if (count == -1) {
      bool sizes_failed = false;
      try {
        tachyon::bytes_sizes(buf);
      } catch (const nb::builtin_exception&) {
        sizes_failed = true;
      }
      require(sizes_failed, "bytes_sizes accepts what decode refuses");
    }
  } catch (const nb::python_error& e) {
    std::fprintf(stderr, "bytes_codec: Python error: %s\n", e.what());
    std::abort();
  }
  require(PyErr_Occurred() == nullptr, "a Python error was left set");
  require(Py_REFCNT(buf.ptr()) == refs, "a reference to the buffer was leaked");
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  setenv("PYTHONMALLOC", "malloc", 1);  // every object in its own malloc block, seen by ASan
  Py_InitializeEx(0);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size < 1) {
    return 0;
  }
  const std::uint8_t mode = data[0];
  const std::int64_t count =
      mode == 0xff ? -1 : mode == 0xfe ? (std::int64_t{1} << 62) : std::int64_t{mode & 0x3f};
  const int kind = (mode >> 6) % 3;
  const char* buffer = reinterpret_cast<const char*>(data + 1);
  check(buffer, size - 1, count, kind);
  check(buffer, size - 1, -1, (kind + 1) % 3);
  return 0;
}
