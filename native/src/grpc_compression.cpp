#include "grpc_compression.hpp"

#include <zlib.h>

#include <algorithm>
#include <climits>
#include <new>

namespace tachyon::grpc_compression {
namespace {

// zlib's windowBits: 15 is the largest window; +16 selects the gzip wrapper instead of zlib's.
int window_bits(Encoding encoding) { return encoding == Encoding::kGzip ? MAX_WBITS + 16 : MAX_WBITS; }

// The first output buffer of inflate(); it doubles from there, up to the limit.
constexpr std::size_t kFirstOutput = 16 * 1024;

struct InflateEnd {
  z_stream* stream;
  ~InflateEnd() { inflateEnd(stream); }
};

struct DeflateEnd {
  z_stream* stream;
  ~DeflateEnd() { deflateEnd(stream); }
};

std::string_view trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) {
    s.remove_prefix(1);
  }
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t')) {
    s.remove_suffix(1);
  }
  return s;
}

}  // namespace

Encoding parse_encoding(std::string_view name) {
  if (name.empty() || name == "identity") {
    return Encoding::kIdentity;
  }
  if (name == "gzip") {
    return Encoding::kGzip;
  }
  if (name == "deflate") {
    return Encoding::kDeflate;
  }
  return Encoding::kUnknown;
}

std::string_view encoding_name(Encoding encoding) {
  switch (encoding) {
    case Encoding::kIdentity:
      return "identity";
    case Encoding::kDeflate:
      return "deflate";
    case Encoding::kGzip:
      return "gzip";
    case Encoding::kUnknown:
      break;
  }
  return "unknown";
}

bool accepts(std::string_view accept_encoding, Encoding encoding) {
  if (encoding == Encoding::kUnknown) {
    return false;
  }
  const std::string_view wanted = encoding_name(encoding);
  while (!accept_encoding.empty()) {
    const std::size_t comma = accept_encoding.find(',');
    const std::string_view item = trim(accept_encoding.substr(0, comma));
    if (item == wanted) {
      return true;
    }
    if (comma == std::string_view::npos) {
      break;
    }
    accept_encoding.remove_prefix(comma + 1);
  }
  return false;
}

InflateResult inflate(Encoding encoding, const char* data, std::size_t size, std::size_t max_out,
                      std::string& out) {
  z_stream zs{};
  const int init = inflateInit2(&zs, window_bits(encoding));
  if (init == Z_MEM_ERROR) {
    throw std::bad_alloc();
  }
  if (init != Z_OK) {
    return InflateResult::kMalformed;
  }
  const InflateEnd end{&zs};
  const auto* next_in = reinterpret_cast<const Bytef*>(data);
  std::size_t in_left = size;
  out.clear();
  std::size_t produced = 0;
  for (;;) {
    // avail_in and avail_out are 32-bit: larger spans are handed over in pieces.
    if (zs.avail_in == 0 && in_left != 0) {
      const std::size_t n = std::min<std::size_t>(in_left, UINT_MAX);
      zs.next_in = const_cast<Bytef*>(next_in);
      zs.avail_in = static_cast<uInt>(n);
      next_in += n;
      in_left -= n;
    }
    if (produced == out.size()) {
      if (out.size() == max_out) {
        // Full at the limit: the message is too large if inflate has even one more byte.
        Bytef probe = 0;
        zs.next_out = &probe;
        zs.avail_out = 1;
        const int rc = ::inflate(&zs, Z_NO_FLUSH);
        if (zs.avail_out == 0) {
          return InflateResult::kTooLarge;
        }
        if (rc == Z_STREAM_END) {
          break;
        }
        if (rc == Z_MEM_ERROR) {
          throw std::bad_alloc();
        }
        if (rc == Z_OK) {
          continue;  // it read input (a header or trailer) without output
        }
        return InflateResult::kMalformed;  // corrupt, or the input ended early
      }
      const std::size_t grown = std::max(kFirstOutput, out.size() * 2);
      out.resize(std::min(grown, max_out));
    }
    const std::size_t room = std::min<std::size_t>(out.size() - produced, UINT_MAX);
    zs.next_out = reinterpret_cast<Bytef*>(&out[produced]);
    zs.avail_out = static_cast<uInt>(room);
    const int rc = ::inflate(&zs, Z_NO_FLUSH);
    produced += room - zs.avail_out;
    if (rc == Z_STREAM_END) {
      break;
    }
    if (rc == Z_MEM_ERROR) {
      throw std::bad_alloc();
    }
    if (rc == Z_OK || (rc == Z_BUF_ERROR && zs.avail_out == 0)) {
      continue;  // the next turn gives it more room (or probes at the limit)
    }
    return InflateResult::kMalformed;  // Z_DATA_ERROR, Z_NEED_DICT, or the input ended early
  }
  // grpc-core refuses bytes after the end of the compressed stream; so do we.
  if (zs.avail_in != 0 || in_left != 0) {
    return InflateResult::kMalformed;
  }
  out.resize(produced);
  return InflateResult::kOk;
}

bool deflate(Encoding encoding, const char* data, std::size_t size, std::string& out) {
  if (size < 2 || size > UINT_MAX) {
    return false;
  }
  z_stream zs{};
  // grpc-core's settings: the default level, the largest window, the default memory level.
  const int init =
      deflateInit2(&zs, Z_DEFAULT_COMPRESSION, Z_DEFLATED, window_bits(encoding), 8,
                   Z_DEFAULT_STRATEGY);
  if (init == Z_MEM_ERROR) {
    throw std::bad_alloc();
  }
  if (init != Z_OK) {
    return false;
  }
  const DeflateEnd end{&zs};
  // Room for one byte less than the input: a result that does not fit is not worth sending.
  out.resize(size - 1);
  zs.next_in = reinterpret_cast<Bytef*>(const_cast<char*>(data));
  zs.avail_in = static_cast<uInt>(size);
  zs.next_out = reinterpret_cast<Bytef*>(&out[0]);
  zs.avail_out = static_cast<uInt>(out.size());
  const int rc = ::deflate(&zs, Z_FINISH);
  if (rc == Z_MEM_ERROR) {
    throw std::bad_alloc();
  }
  if (rc != Z_STREAM_END) {
    return false;  // did not fit: not smaller than the input
  }
  out.resize(out.size() - zs.avail_out);
  return true;
}

}  // namespace tachyon::grpc_compression
