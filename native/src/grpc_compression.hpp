// gRPC message compression (https://github.com/grpc/grpc/blob/master/doc/compression.md): the
// grpc-encoding names this front end knows, and zlib's inflate / deflate of one message. Free of
// any Python or nghttp2 dependency.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>

namespace tachyon::grpc_compression {

enum class Encoding {
  kIdentity,  // no grpc-encoding header, or "identity"
  kDeflate,   // "deflate": zlib format (RFC 1950), as grpc-core sends it
  kGzip,      // "gzip" (RFC 1952)
  kUnknown,   // anything else: its messages cannot be read
};

// What we advertise in grpc-accept-encoding on every response.
inline constexpr std::string_view kAcceptEncoding = "identity,deflate,gzip";

Encoding parse_encoding(std::string_view name);
std::string_view encoding_name(Encoding encoding);

// Whether a grpc-accept-encoding value ("identity,deflate,gzip", spaces allowed) lists `encoding`.
bool accepts(std::string_view accept_encoding, Encoding encoding);

enum class InflateResult {
  kOk,
  kTooLarge,   // the output would exceed the limit: stopped there
  kMalformed,  // not valid data of the encoding, or truncated
};

// Decompresses `size` bytes of `encoding` (deflate or gzip) into `out` (replaced). The output
// grows as inflate produces it and never past `max_out` bytes: a small message that would expand
// beyond the limit (a zip bomb) stops at the limit with kTooLarge. Throws std::bad_alloc only.
InflateResult inflate(Encoding encoding, const char* data, std::size_t size, std::size_t max_out,
                      std::string& out);

// Compresses `size` bytes with `encoding` (deflate or gzip) into `out` (replaced). Returns false,
// leaving `out` unspecified, when zlib fails or the result would not be smaller than the input:
// the caller then sends the message uncompressed. Throws std::bad_alloc only.
bool deflate(Encoding encoding, const char* data, std::size_t size, std::string& out);

}  // namespace tachyon::grpc_compression
