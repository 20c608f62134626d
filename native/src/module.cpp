// Python bindings of server._native: the BYTES codec and the native gRPC front end.
#include "bytes_codec.hpp"
#include "gil.hpp"
#ifdef TACHYON_HAVE_GRPC_FRONTEND
#include "grpc_frontend_py.hpp"
#include "infer_router_py.hpp"
#endif

#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>

namespace nb = nanobind;
using namespace nb::literals;

NB_MODULE(_native, m) {
  m.doc() =
      "C++ hot paths for Tachyon: KServe v2 BYTES (de)serialization and the gRPC front end.\n"
      "Every function takes a whole batch per call, accepts any object exposing the buffer\n"
      "protocol (bytes, bytearray, memoryview, numpy arrays; read-only is fine), releases the\n"
      "GIL around copies of at least GIL_RELEASE_THRESHOLD bytes and keeps no reference to\n"
      "its arguments after returning.";

  m.attr("GIL_RELEASE_THRESHOLD") = tachyon::kGilReleaseBytes;
#ifdef TACHYON_HAVE_GRPC_FRONTEND
  m.attr("HAVE_GRPC_FRONTEND") = true;
  tachyon::register_grpc_frontend(m);
  tachyon::register_infer_router(m);
#else
  m.attr("HAVE_GRPC_FRONTEND") = false;
#endif

  m.def("encode_bytes", &tachyon::encode_bytes, "items"_a,
        nb::sig("def encode_bytes(items: collections.abc.Iterable[bytes | bytearray | "
                "memoryview | str | collections.abc.Buffer] | numpy.ndarray) -> bytes"),
        "Serialize elements as a KServe v2 / Triton BYTES tensor: per element a 4-byte\n"
        "little-endian uint32 length, then its bytes. str is encoded as UTF-8; any other\n"
        "element must expose a C-contiguous buffer (its raw bytes are used). ``items`` may be\n"
        "any iterable; a numpy array (object, bytes_ or str_ dtype, any shape) is flattened\n"
        "in C order first. A single bytes/str object is rejected with TypeError.");

  m.def("decode_bytes", &tachyon::decode_bytes, "buf"_a, "count"_a = -1,
        nb::sig("def decode_bytes(buf: collections.abc.Buffer, count: int = -1) -> list[bytes]"),
        "Parse a KServe v2 / Triton BYTES tensor into a list of bytes objects.\n\n"
        "Exactly ``count`` elements are parsed; ``count=-1`` parses as many as the buffer\n"
        "holds. Raises ValueError when a length prefix is truncated or overruns the buffer,\n"
        "when the buffer holds fewer than ``count`` elements, or when bytes are left over.");

  m.def("bytes_sizes", &tachyon::bytes_sizes, "buf"_a,
        nb::sig("def bytes_sizes(buf: collections.abc.Buffer) -> int"),
        "Number of elements in a BYTES tensor buffer (which must end on an element\n"
        "boundary), without creating them. Raises ValueError like ``decode_bytes(buf, -1)``.");
}
