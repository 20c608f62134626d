// libFuzzer target: the BYTES tensor wire format (bytes_wire::scan and describe, the parser
// behind server._native.decode_bytes / bytes_sizes) over arbitrary buffers.
//
// Input: 1 byte choosing the element count asked for, then the buffer. Checks, besides the
// sanitizers:
//   - every span lies inside the buffer and the counters agree with the spans;
//   - a successful scan re-encodes (as encode_bytes writes it) to exactly the input, and the
//     elements re-scan to themselves;
//   - a failure's details are consistent with where it stopped, and scanning without spans
//     gives the same result.
#include "bytes_wire.hpp"

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {

namespace bw = tachyon::bytes_wire;
using tachyon::Span;

void require(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "bytes_wire: %s\n", what);
    std::abort();
  }
}

bool same(const bw::ScanResult& a, const bw::ScanResult& b) {
  return a.status == b.status && a.elements == b.elements && a.payload_bytes == b.payload_bytes &&
         a.offset == b.offset && a.declared == b.declared && a.remaining == b.remaining;
}

// encode_bytes' loop (bytes_codec.cpp): per element a little-endian length, then its bytes.
std::vector<unsigned char> encode(const unsigned char* base, const std::vector<Span>& spans) {
  std::size_t total = 0;
  for (const Span& s : spans) {
    total += bw::kPrefixBytes + s.size;
  }
  std::vector<unsigned char> out(total);
  unsigned char* dst = out.data();
  for (const Span& s : spans) {
    bw::store_le32(dst, static_cast<std::uint32_t>(s.size));
    dst += bw::kPrefixBytes;
    if (s.size != 0) {
      std::memcpy(dst, base + s.offset, s.size);
      dst += s.size;
    }
  }
  return out;
}

void check(const unsigned char* buf, std::size_t len, std::int64_t count) {
  std::vector<Span> spans;
  const bw::ScanResult r = bw::scan(buf, len, count, &spans);
  require(same(r, bw::scan(buf, len, count, nullptr)), "spans change the result");
  require(spans.size() == r.elements, "element count differs from the spans");
  std::size_t payload = 0;
  std::size_t next = 0;
  for (const Span& s : spans) {
    require(s.offset == next + bw::kPrefixBytes, "spans are not back to back");
    require(s.offset <= len && s.size <= len - s.offset, "a span leaves the buffer");
    require(bw::load_le32(buf + s.offset - bw::kPrefixBytes) == s.size, "a span's size is wrong");
    payload += s.size;
    next = s.offset + s.size;
  }
  require(payload == r.payload_bytes, "payload_bytes differs from the spans");
  const std::string message = bw::describe(r, count, len);
  require(!message.empty(), "empty description");

  switch (r.status) {
    case bw::ScanStatus::kOk: {
      require(count < 0 || r.elements == static_cast<std::uint64_t>(count), "wrong count");
      const std::vector<unsigned char> again = encode(buf, spans);
      require(again.size() == len && (len == 0 || std::memcmp(again.data(), buf, len) == 0),
              "re-encoding the elements does not give the input back");
      std::vector<Span> spans2;
      require(same(bw::scan(again.data(), again.size(), static_cast<std::int64_t>(r.elements),
                            &spans2),
                   r),
              "the re-encoded buffer scans differently");
      break;
    }
    case bw::ScanStatus::kMissingElements:
      require(count >= 0 && r.elements < static_cast<std::uint64_t>(count) && next == len,
              "inconsistent kMissingElements");
      break;
    case bw::ScanStatus::kShortPrefix:
      require(r.remaining > 0 && r.remaining < bw::kPrefixBytes && r.offset == next &&
                  r.offset + r.remaining == len,
              "inconsistent kShortPrefix");
      break;
    case bw::ScanStatus::kOverrun:
      require(r.declared > r.remaining && r.offset == next + bw::kPrefixBytes &&
                  r.offset + r.remaining == len,
              "inconsistent kOverrun");
      break;
    case bw::ScanStatus::kTrailing:
      require(count >= 0 && r.remaining > 0 && r.offset == next && r.offset + r.remaining == len,
              "inconsistent kTrailing");
      break;
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size < 1) {
    return 0;
  }
  // 0xff: all elements (-1); 0xfe: an absurd count, which must not be trusted for anything;
  // otherwise that many elements.
  const std::int64_t count =
      data[0] == 0xff ? -1 : data[0] == 0xfe ? (std::int64_t{1} << 62) : std::int64_t{data[0]};
  const std::vector<unsigned char> buf(data + 1, data + size);  // exact size: ASan sees overreads
  check(buf.data(), buf.size(), count);
  check(buf.data(), buf.size(), -1);
  return 0;
}
