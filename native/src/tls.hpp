// TLS for the native gRPC front end (OpenSSL): a server context built from PEM files, and one
// session per connection that encrypts and decrypts through memory buffers. TLS never touches a
// socket: the I/O loop keeps doing every non-blocking read and write itself, feeds what it read
// to receive() and sends what seal() gives it, so the handshake runs inside the epoll loop
// without ever blocking, and a read or write that would block is just the loop's EAGAIN.
//
// Policy, as grpc-core's servers: TLS 1.2 or later (1.2 with ECDHE and AEAD ciphers only, as
// HTTP/2 requires), ALPN "h2" required (a client that does not offer it fails the handshake,
// one that sends no ALPN is refused once the handshake ends), no renegotiation, and with
// `mutual` a client certificate that chains to the root certificates, required.
//
// Threads: a ServerContext is built on the application thread and then only read (OpenSSL's
// SSL_CTX is safe to share); each Session belongs to the I/O thread.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

struct ssl_ctx_st;  // OpenSSL's SSL_CTX
struct ssl_st;      // OpenSSL's SSL

namespace tachyon::tls {

// OpenSSL's memory buffers keep the capacity they grew to: feeding and sealing at most this much
// at a time (decrypting or draining in between) bounds them per connection.
inline constexpr std::size_t kPieceBytes = 64 * 1024;

struct ServerOptions {
  std::string cert_file;  // PEM certificate chain, the server's first; empty: no TLS
  std::string key_file;   // PEM private key of cert_file, not encrypted
  std::string root_file;  // PEM certificates client certificates must chain to (mutual only)
  bool mutual = false;    // require a client certificate, verified against root_file

  bool enabled() const { return !cert_file.empty(); }
};

class Session;

class ServerContext {
 public:
  // Loads the certificate chain, the key (checked against it) and, with `mutual`, the roots.
  // Throws std::invalid_argument naming the file and OpenSSL's reason when one does not load.
  explicit ServerContext(const ServerOptions& options);
  ~ServerContext();

  ServerContext(const ServerContext&) = delete;
  ServerContext& operator=(const ServerContext&) = delete;

  // A server session for one new connection; null when OpenSSL is out of memory.
  std::unique_ptr<Session> accept() const noexcept;

 private:
  ssl_ctx_st* ctx_ = nullptr;
};

class Session {
 public:
  enum class State {
    kHandshaking,  // waiting for the client's handshake messages
    kOpen,         // handshake done, "h2" negotiated: application data flows
    kClosed,       // the client sent close_notify: it sends nothing more
    kFailed,       // handshake or record error; seal() may still hold an alert to send
  };

  explicit Session(ssl_st* ssl) noexcept : ssl_(ssl) {}
  ~Session();

  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;

  // Takes ciphertext read from the socket (copied), advancing the handshake; at most
  // kPieceBytes at a time, read() in between. False when out of memory.
  bool feed(const std::uint8_t* data, std::size_t len) noexcept;

  // Decrypts what feed() gave into `buf`, filling it as far as it can: the plaintext bytes
  // written (0: none until more is fed, or the state is no longer kOpen). Call it until it
  // returns 0, then check state().
  std::size_t read(std::uint8_t* buf, std::size_t cap) noexcept;

  // Encrypts `data` (plaintext, possibly empty; dropped unless kOpen) and replaces it with every
  // byte TLS has to send: handshake messages, records, alerts. `scratch` is any spare buffer
  // (its contents are lost; it gets `data`'s old one, so one scratch serves every session of a
  // thread). False when out of memory or the session failed while writing.
  bool seal(std::string& data, std::string& scratch) noexcept;

  // Queues close_notify for the next seal().
  void close() noexcept;

  State state() const { return state_; }

 private:
  void handshake() noexcept;
  bool drain(std::string& out) noexcept;
  void fail() noexcept;

  ssl_st* ssl_;
  State state_ = State::kHandshaking;
};

}  // namespace tachyon::tls
