// The gRPC-over-HTTP/2 message framing and status encoding, free of any Python or nghttp2
// dependency: every message on a call's DATA frames is a 1-byte compressed flag, a 4-byte
// big-endian length, then that many bytes; the call ends with trailers carrying grpc-status and
// a percent-encoded grpc-message (https://github.com/grpc/grpc/blob/master/doc/PROTOCOL-HTTP2.md).
#pragma once

#include "grpc_compression.hpp"

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace tachyon::grpc_wire {

inline constexpr std::size_t kPrefixBytes = 5;

// The gRPC status codes this front end produces by itself.
inline constexpr int kOk = 0;
inline constexpr int kDeadlineExceeded = 4;
inline constexpr int kResourceExhausted = 8;
inline constexpr int kUnimplemented = 12;
inline constexpr int kInternal = 13;

// Writes the 5-byte prefix of a message of `size` bytes at `out`.
inline void write_prefix(char* out, std::uint32_t size, bool compressed = false) {
  out[0] = compressed ? 1 : 0;
  out[1] = static_cast<char>(size >> 24);
  out[2] = static_cast<char>(size >> 16);
  out[3] = static_cast<char>(size >> 8);
  out[4] = static_cast<char>(size);
}

// A message with its prefix, ready for the wire.
inline std::string frame(const char* data, std::uint32_t size) {
  char prefix[kPrefixBytes];
  write_prefix(prefix, size);
  std::string out;
  out.reserve(kPrefixBytes + size);
  out.append(prefix, kPrefixBytes);
  out.append(data, size);
  return out;
}

// Parses grpc-timeout: 1 to 8 ASCII digits, then a unit (H, M, S, m, u, n). nullopt when
// malformed; a duration too long for nanoseconds saturates at nanoseconds::max().
inline std::optional<std::chrono::nanoseconds> parse_timeout(std::string_view text) {
  if (text.size() < 2 || text.size() > 9) {
    return std::nullopt;
  }
  std::int64_t value = 0;
  for (const char c : text.substr(0, text.size() - 1)) {
    if (c < '0' || c > '9') {
      return std::nullopt;
    }
    value = value * 10 + (c - '0');  // at most 99,999,999
  }
  std::int64_t unit_ns = 0;
  switch (text.back()) {
    case 'H': unit_ns = 3'600'000'000'000; break;
    case 'M': unit_ns = 60'000'000'000; break;
    case 'S': unit_ns = 1'000'000'000; break;
    case 'm': unit_ns = 1'000'000; break;
    case 'u': unit_ns = 1'000; break;
    case 'n': unit_ns = 1; break;
    default: return std::nullopt;
  }
  using std::chrono::nanoseconds;
  if (value > nanoseconds::max().count() / unit_ns) {
    return nanoseconds::max();
  }
  return nanoseconds(value * unit_ns);
}

// grpc-message is percent-encoded: bytes outside printable ASCII, and '%' itself, become %XX.
inline std::string percent_encode(const std::string& text) {
  static constexpr char kHex[] = "0123456789ABCDEF";
  std::string out;
  out.reserve(text.size());
  for (const char ch : text) {
    const auto c = static_cast<unsigned char>(ch);
    if (c >= 0x20 && c <= 0x7e && c != '%') {
      out.push_back(ch);
    } else {
      out.push_back('%');
      out.push_back(kHex[c >> 4]);
      out.push_back(kHex[c & 0xf]);
    }
  }
  return out;
}

// A failure found while reading a call's messages: a gRPC status code and its message.
struct ReadError {
  int code = kOk;
  std::string message;
  explicit operator bool() const { return code != kOk; }
};

// Splits the DATA bytes of one call into messages, fed in arbitrary pieces, and inflates the
// compressed ones. Every declared length is checked against the limit before a byte of the
// message is buffered, and inflating stops at the limit, so neither an oversized length nor a
// zip bomb allocates beyond it.
class MessageReader {
 public:
  explicit MessageReader(std::size_t max_message_bytes) : max_(max_message_bytes) {}

  // The call's grpc-encoding, known before its first DATA byte; `name` as the client sent it.
  void set_encoding(grpc_compression::Encoding encoding, std::string_view name) {
    encoding_ = encoding;
    encoding_name_.assign(name.data(), name.size());
  }

  // Consumes `len` bytes; calls on_message(std::string&&) for every message completed. Stops at
  // the first error, which it returns (later calls keep returning it). Throws std::bad_alloc.
  template <class OnMessage>
  ReadError feed(const std::uint8_t* data, std::size_t len, OnMessage&& on_message) {
    while (len > 0 && !error_) {
      if (prefix_have_ < kPrefixBytes) {
        const std::size_t n = len < kPrefixBytes - prefix_have_ ? len : kPrefixBytes - prefix_have_;
        for (std::size_t i = 0; i < n; ++i) {
          prefix_[prefix_have_++] = data[i];
        }
        data += n;
        len -= n;
        if (prefix_have_ == kPrefixBytes) {
          begin_message();
          if (!error_ && need_ == 0) {
            finish_message(on_message);
          }
        }
        continue;
      }
      const std::size_t n = len < need_ ? len : need_;
      grow_for(n);
      message_.append(reinterpret_cast<const char*>(data), n);
      data += n;
      len -= n;
      need_ -= n;
      if (need_ == 0) {
        finish_message(on_message);
      }
    }
    return error_;
  }

  // True between messages: the bytes fed so far end exactly on a message boundary.
  bool at_boundary() const { return prefix_have_ == 0; }

  // Bytes of the message in progress held so far (0 between messages).
  std::size_t buffered() const { return message_.size(); }

  // Frees the message in progress; later bytes are dropped (feed() returns an error).
  void discard() {
    if (!error_) {
      error_ = {kInternal, "the call ended"};
    }
    std::string().swap(message_);
  }

 private:
  void begin_message() {
    using grpc_compression::Encoding;
    const std::uint8_t flag = prefix_[0];
    const std::size_t size = (static_cast<std::size_t>(prefix_[1]) << 24) |
                             (static_cast<std::size_t>(prefix_[2]) << 16) |
                             (static_cast<std::size_t>(prefix_[3]) << 8) |
                             static_cast<std::size_t>(prefix_[4]);
    if (flag > 1) {
      error_ = {kInternal, "malformed gRPC message: compressed flag is " + std::to_string(flag) +
                               ", expected 0 or 1"};
      return;
    }
    compressed_ = flag == 1;
    if (compressed_ && encoding_ == Encoding::kIdentity) {
      // compression.md: the flag without a grpc-encoding other than identity is INTERNAL.
      error_ = {kInternal, "malformed gRPC message: the compressed flag is set but the call's "
                           "grpc-encoding is identity (or absent)"};
      return;
    }
    if (compressed_ && encoding_ == Encoding::kUnknown) {
      // compression.md: UNIMPLEMENTED, naming what the server accepts (grpc-accept-encoding
      // on the response says it too).
      error_ = {kUnimplemented, "grpc-encoding '" + encoding_name_ + "' is not supported: "
                                "send identity, deflate or gzip"};
      return;
    }
    if (size > max_) {
      // The wording of grpc-core's own check, which clients and tests already recognise.
      error_ = {kResourceExhausted, "Received message larger than max (" + std::to_string(size) +
                                        " vs. " + std::to_string(max_) + ")"};
      return;
    }
    need_ = size;
    declared_ = size;
    message_.clear();
  }

  // Room for `n` more bytes of the current message, grown with the bytes that arrived rather
  // than reserved for the declared size up front: a client that declares 64 MB and sends
  // nothing makes the server allocate nothing. Capacity grows fourfold, and to the declared size
  // once that is at most twice the next step: a 64 MiB message is copied 21 MiB more than with
  // one allocation (doubling copies 64 MiB more), and the capacity stays within 8x what came.
  void grow_for(std::size_t n) {
    const std::size_t need = message_.size() + n;
    if (need <= message_.capacity()) {
      return;
    }
    std::size_t capacity = std::max(need, 4 * message_.capacity());
    if (2 * capacity >= declared_) {
      capacity = declared_;
    }
    message_.reserve(capacity);
  }

  template <class OnMessage>
  void finish_message(OnMessage& on_message) {
    prefix_have_ = 0;
    if (compressed_ && !inflate_message()) {
      return;
    }
    on_message(std::move(message_));
    message_ = std::string();
  }

  // Replaces message_ by its inflated bytes; false (error_ set) when it cannot.
  bool inflate_message() {
    using grpc_compression::InflateResult;
    std::string plain;
    const InflateResult result =
        grpc_compression::inflate(encoding_, message_.data(), message_.size(), max_, plain);
    if (result == InflateResult::kTooLarge) {
      error_ = {kResourceExhausted, "Received message larger than max: its " + encoding_name_ +
                                        " data inflates to more than " + std::to_string(max_) +
                                        " bytes"};
      return false;
    }
    if (result == InflateResult::kMalformed) {
      error_ = {kInternal, "could not decompress a " + encoding_name_ +
                               " message: the data is corrupt or truncated"};
      return false;
    }
    message_ = std::move(plain);
    return true;
  }

  std::size_t max_;
  grpc_compression::Encoding encoding_ = grpc_compression::Encoding::kIdentity;
  std::string encoding_name_;
  std::uint8_t prefix_[kPrefixBytes] = {};
  std::size_t prefix_have_ = 0;
  std::size_t need_ = 0;  // bytes of the current message still to come
  std::size_t declared_ = 0;  // the current message's size, from its prefix
  bool compressed_ = false;
  std::string message_;
  ReadError error_;
};

}  // namespace tachyon::grpc_wire
