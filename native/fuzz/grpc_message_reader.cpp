// libFuzzer target: grpc_wire::MessageReader over arbitrary DATA bytes fed in arbitrary pieces,
// with each of the call encodings (identity, deflate, gzip, unknown), and grpc_compression's
// deflate / inflate round trip.
//
// Input: 2 bytes of message limit (little-endian), 2 bytes seeding the split points, 1 byte
// choosing the encoding, then the call's DATA bytes. Checks, besides the sanitizers:
//   - the messages and the error do not depend on how the bytes were split;
//   - no message, inflated or not, exceeds the limit, and an error is sticky;
//   - messages and the error's status code are those of an independent reading (the framing
//     parsed here, compressed messages inflated by zlib in one call);
//   - every message deflated (when that makes it smaller) reads back as itself, and is refused
//     as RESOURCE_EXHAUSTED under a limit one byte smaller.
#include "grpc_wire.hpp"

#include <zlib.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

namespace {

namespace wire = tachyon::grpc_wire;
namespace gc = tachyon::grpc_compression;
using wire::MessageReader;
using wire::ReadError;

constexpr gc::Encoding kEncodings[] = {gc::Encoding::kIdentity, gc::Encoding::kDeflate,
                                       gc::Encoding::kGzip, gc::Encoding::kUnknown};
constexpr const char* kNames[] = {"identity", "deflate", "gzip", "br"};

void require(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "grpc_message_reader: %s\n", what);
    std::abort();
  }
}

struct Outcome {
  std::vector<std::string> messages;
  int code = wire::kOk;
  std::string error;
  bool at_boundary = true;
};

// Feeds `stream` in pieces whose sizes come from a small xorshift generator (seed 0: whole).
Outcome read_split(const std::uint8_t* stream, std::size_t len, std::size_t limit, int encoding,
                   std::uint32_t seed) {
  Outcome out;
  MessageReader reader(limit);
  reader.set_encoding(kEncodings[encoding], kNames[encoding]);
  auto on_message = [&](std::string&& m) {
    require(out.code == wire::kOk, "a message was delivered after an error");
    require(m.size() <= limit, "a message exceeds the limit");
    out.messages.push_back(std::move(m));
  };
  std::uint32_t state = seed | 1u;
  std::size_t pos = 0;
  while (pos < len) {
    std::size_t piece = len - pos;
    if (seed != 0) {
      state ^= state << 13;
      state ^= state >> 17;
      state ^= state << 5;
      // Mostly tiny pieces (prefixes split across feeds), sometimes large ones.
      piece = (state & 7u) != 0 ? state % 8u : state % 4096u;
      piece = piece < len - pos ? piece : len - pos;
    }
    const ReadError e = reader.feed(stream + pos, piece, on_message);
    if (out.code != wire::kOk) {
      require(e.code == out.code && e.message == out.error, "an error changed");
    }
    out.code = e.code;
    out.error = e.message;
    pos += piece;
  }
  const ReadError again = reader.feed(stream, 0, on_message);
  require(again.code == out.code, "an empty feed changed the error");
  out.at_boundary = reader.at_boundary();
  return out;
}

// zlib in one call, into a buffer one byte larger than the limit. 0: ok, else the status code.
int reference_inflate(int encoding, const std::uint8_t* data, std::size_t size, std::size_t limit,
                      std::string& out) {
  z_stream zs{};
  const int bits = kEncodings[encoding] == gc::Encoding::kGzip ? MAX_WBITS + 16 : MAX_WBITS;
  require(inflateInit2(&zs, bits) == Z_OK, "inflateInit2");
  std::vector<Bytef> buf(limit + 1);
  zs.next_in = const_cast<Bytef*>(data);
  zs.avail_in = static_cast<uInt>(size);
  zs.next_out = buf.data();
  zs.avail_out = static_cast<uInt>(buf.size());
  const int rc = ::inflate(&zs, Z_FINISH);
  const std::size_t produced = buf.size() - zs.avail_out;
  const std::size_t left = zs.avail_in;
  inflateEnd(&zs);
  if (produced > limit) {
    return wire::kResourceExhausted;
  }
  if (rc != Z_STREAM_END || left != 0) {
    return wire::kInternal;
  }
  out.assign(reinterpret_cast<const char*>(buf.data()), produced);
  return wire::kOk;
}

// The messages and the status code an independent reading of the whole stream finds.
Outcome read_reference(const std::uint8_t* p, std::size_t len, std::size_t limit, int encoding) {
  Outcome ex;
  std::size_t pos = 0;
  while (len - pos >= wire::kPrefixBytes) {
    const std::uint8_t flag = p[pos];
    const std::size_t size = (std::size_t{p[pos + 1]} << 24) | (std::size_t{p[pos + 2]} << 16) |
                             (std::size_t{p[pos + 3]} << 8) | std::size_t{p[pos + 4]};
    if (flag > 1 || (flag == 1 && kEncodings[encoding] == gc::Encoding::kIdentity)) {
      ex.code = wire::kInternal;
      return ex;
    }
    if (flag == 1 && kEncodings[encoding] == gc::Encoding::kUnknown) {
      ex.code = wire::kUnimplemented;
      return ex;
    }
    if (size > limit) {
      ex.code = wire::kResourceExhausted;
      return ex;
    }
    if (size > len - pos - wire::kPrefixBytes) {
      ex.at_boundary = false;
      return ex;
    }
    const std::uint8_t* body = p + pos + wire::kPrefixBytes;
    std::string message(reinterpret_cast<const char*>(body), size);
    if (flag == 1) {
      ex.code = reference_inflate(encoding, body, size, limit, message);
      if (ex.code != wire::kOk) {
        return ex;
      }
    }
    ex.messages.push_back(std::move(message));
    pos += wire::kPrefixBytes + size;
  }
  ex.at_boundary = pos == len;
  return ex;
}

void check_round_trip(const std::string& message, int encoding) {
  std::string packed;
  if (!gc::deflate(kEncodings[encoding], message.data(), message.size(), packed)) {
    return;  // not smaller: sent uncompressed
  }
  require(packed.size() < message.size(), "deflate made a message larger");
  std::string framed(wire::kPrefixBytes, '\0');
  wire::write_prefix(framed.data(), static_cast<std::uint32_t>(packed.size()), true);
  framed += packed;
  const auto* bytes = reinterpret_cast<const std::uint8_t*>(framed.data());

  const Outcome fits = read_split(bytes, framed.size(), message.size(), encoding, 7);
  require(fits.code == wire::kOk && fits.messages.size() == 1 && fits.messages[0] == message,
          "a deflated message does not read back as itself");
  const Outcome tight = read_split(bytes, framed.size(), message.size() - 1, encoding, 0);
  require(tight.code == wire::kResourceExhausted && tight.messages.empty(),
          "a message inflating past the limit was not RESOURCE_EXHAUSTED");
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size < 5) {
    return 0;
  }
  const std::size_t limit = std::size_t{data[0]} | (std::size_t{data[1]} << 8);
  const std::uint32_t seed = std::uint32_t{data[2]} | (std::uint32_t{data[3]} << 8);
  const int encoding = data[4] % 4;
  const std::uint8_t* stream = data + 5;
  const std::size_t len = size - 5;

  const Outcome whole = read_split(stream, len, limit, encoding, 0);
  const Outcome split = read_split(stream, len, limit, encoding, seed + 1);
  require(whole.messages == split.messages, "messages depend on the split");
  require(whole.code == split.code && whole.error == split.error, "the error depends on the split");
  require(whole.at_boundary == split.at_boundary, "at_boundary depends on the split");

  const Outcome ex = read_reference(stream, len, limit, encoding);
  require(whole.messages == ex.messages, "messages differ from an independent reading");
  require(whole.code == ex.code, "the status code differs from an independent reading");
  require(whole.code != wire::kOk || whole.at_boundary == ex.at_boundary,
          "at_boundary differs from an independent reading");

  if (kEncodings[encoding] == gc::Encoding::kDeflate ||
      kEncodings[encoding] == gc::Encoding::kGzip) {
    for (std::size_t i = 0; i < whole.messages.size() && i < 4; ++i) {
      check_round_trip(whole.messages[i], encoding);
    }
  }
  return 0;
}
