#include "tls.hpp"

#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>

#include <algorithm>
#include <climits>
#include <cstring>
#include <new>
#include <stdexcept>
#include <string_view>

namespace tachyon::tls {
namespace {

// TLS 1.2 suites HTTP/2 allows (RFC 9113, 9.2.2: ephemeral key exchange, AEAD), as grpc-core
// offers them; TLS 1.3's suites are all AEAD and keep OpenSSL's defaults.
constexpr const char* kTls12Ciphers =
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305";

constexpr std::string_view kH2 = "h2";
constexpr unsigned char kSessionContext[] = "tachyon-grpc";

// OpenSSL's queued errors, oldest first, then cleared.
std::string openssl_errors() {
  std::string out;
  while (const unsigned long code = ERR_get_error()) {
    char text[256];
    ERR_error_string_n(code, text, sizeof text);
    if (!out.empty()) {
      out += "; ";
    }
    out += text;
  }
  return out.empty() ? "no reason given" : out;
}

[[noreturn]] void refuse(const std::string& what, const std::string& file) {
  throw std::invalid_argument("TLS: cannot load " + what + " '" + file + "': " + openssl_errors());
}

// An encrypted key fails to load instead of prompting on the terminal.
int no_password(char*, int, int, void*) { return 0; }

// Chooses "h2" from the client's ALPN list (length-prefixed names); a client that does not
// offer it gets the no_application_protocol alert.
int select_h2(SSL*, const unsigned char** out, unsigned char* outlen, const unsigned char* in,
              unsigned int inlen, void*) {
  unsigned int i = 0;
  while (i < inlen) {
    const unsigned int len = in[i];
    if (len > inlen - i - 1) {
      break;  // malformed list
    }
    if (len == kH2.size() && std::memcmp(in + i + 1, kH2.data(), len) == 0) {
      *out = in + i + 1;
      *outlen = static_cast<unsigned char>(len);
      return SSL_TLSEXT_ERR_OK;
    }
    i += 1 + len;
  }
  return SSL_TLSEXT_ERR_ALERT_FATAL;
}

}  // namespace

ServerContext::ServerContext(const ServerOptions& options) {
  ERR_clear_error();
  ctx_ = SSL_CTX_new(TLS_server_method());
  if (ctx_ == nullptr) {
    throw std::bad_alloc();
  }
  try {
    SSL_CTX_set_min_proto_version(ctx_, TLS1_2_VERSION);
    SSL_CTX_set_options(ctx_, SSL_OP_NO_RENEGOTIATION | SSL_OP_CIPHER_SERVER_PREFERENCE |
                                  SSL_OP_NO_COMPRESSION);
    if (SSL_CTX_set_cipher_list(ctx_, kTls12Ciphers) != 1) {
      throw std::logic_error("TLS: OpenSSL refused the cipher list: " + openssl_errors());
    }
    SSL_CTX_set_default_passwd_cb(ctx_, &no_password);
    if (SSL_CTX_use_certificate_chain_file(ctx_, options.cert_file.c_str()) != 1) {
      refuse("the server certificate", options.cert_file);
    }
    if (SSL_CTX_use_PrivateKey_file(ctx_, options.key_file.c_str(), SSL_FILETYPE_PEM) != 1) {
      refuse("the server key (PEM, not encrypted)", options.key_file);
    }
    if (SSL_CTX_check_private_key(ctx_) != 1) {
      refuse("the server key (it does not match the certificate)", options.key_file);
    }
    if (options.mutual) {
      if (SSL_CTX_load_verify_locations(ctx_, options.root_file.c_str(), nullptr) != 1) {
        refuse("the root certificates", options.root_file);
      }
      // The names of the acceptable CAs, sent with the certificate request.
      STACK_OF(X509_NAME)* names = SSL_load_client_CA_file(options.root_file.c_str());
      if (names == nullptr) {
        refuse("the root certificates' names", options.root_file);
      }
      SSL_CTX_set_client_CA_list(ctx_, names);  // takes ownership
      SSL_CTX_set_verify(ctx_, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, nullptr);
    }
    // Resumed sessions keep their verified client; OpenSSL requires a context id for that.
    SSL_CTX_set_session_id_context(ctx_, kSessionContext, sizeof kSessionContext - 1);
    SSL_CTX_set_alpn_select_cb(ctx_, &select_h2, nullptr);
  } catch (...) {
    SSL_CTX_free(ctx_);
    throw;
  }
}

ServerContext::~ServerContext() { SSL_CTX_free(ctx_); }

std::unique_ptr<Session> ServerContext::accept() const noexcept {
  SSL* ssl = SSL_new(ctx_);
  if (ssl == nullptr) {
    ERR_clear_error();
    return nullptr;
  }
  BIO* in = BIO_new(BIO_s_mem());
  BIO* out = BIO_new(BIO_s_mem());
  if (in == nullptr || out == nullptr) {
    BIO_free(in);
    BIO_free(out);
    SSL_free(ssl);
    ERR_clear_error();
    return nullptr;
  }
  // An empty input buffer means "wait for more" (SSL_ERROR_WANT_READ), not end of stream.
  BIO_set_mem_eof_return(in, -1);
  SSL_set_bio(ssl, in, out);  // the SSL owns both from here
  SSL_set_accept_state(ssl);
  try {
    return std::make_unique<Session>(ssl);
  } catch (...) {
    SSL_free(ssl);
    return nullptr;
  }
}

Session::~Session() { SSL_free(ssl_); }

bool Session::feed(const std::uint8_t* data, std::size_t len) noexcept {
  if (state_ == State::kFailed || state_ == State::kClosed) {
    return true;  // nothing more is read from this client
  }
  while (len != 0) {
    const int piece = len > INT_MAX ? INT_MAX : static_cast<int>(len);
    ERR_clear_error();
    if (BIO_write(SSL_get_rbio(ssl_), data, piece) != piece) {
      ERR_clear_error();
      return false;
    }
    data += piece;
    len -= static_cast<std::size_t>(piece);
  }
  if (state_ == State::kHandshaking) {
    handshake();
  }
  return true;
}

void Session::handshake() noexcept {
  ERR_clear_error();
  const int rc = SSL_do_handshake(ssl_);
  if (rc != 1) {
    const int error = SSL_get_error(ssl_, rc);
    if (error != SSL_ERROR_WANT_READ && error != SSL_ERROR_WANT_WRITE) {
      fail();
    }
    return;
  }
  // A client that sent no ALPN skipped select_h2: refuse it here (it would not speak HTTP/2).
  const unsigned char* protocol = nullptr;
  unsigned int len = 0;
  SSL_get0_alpn_selected(ssl_, &protocol, &len);
  if (len != kH2.size() || std::memcmp(protocol, kH2.data(), len) != 0) {
    state_ = State::kFailed;
    return;
  }
  state_ = State::kOpen;
}

std::size_t Session::read(std::uint8_t* buf, std::size_t cap) noexcept {
  std::size_t filled = 0;
  while (filled < cap && state_ == State::kOpen) {
    const std::size_t room = cap - filled;
    ERR_clear_error();
    const int n = SSL_read(ssl_, buf + filled, room > INT_MAX ? INT_MAX : static_cast<int>(room));
    if (n > 0) {
      filled += static_cast<std::size_t>(n);
      continue;
    }
    const int error = SSL_get_error(ssl_, n);
    if (error == SSL_ERROR_ZERO_RETURN) {
      state_ = State::kClosed;
    } else if (error != SSL_ERROR_WANT_READ && error != SSL_ERROR_WANT_WRITE) {
      fail();
    }
    break;
  }
  return filled;
}

bool Session::seal(std::string& data, std::string& scratch) noexcept {
  scratch.clear();
  if (!drain(scratch)) {  // handshake messages first
    return false;
  }
  if (state_ == State::kOpen) {
    for (std::size_t done = 0; done < data.size();) {
      const std::size_t piece = std::min(data.size() - done, kPieceBytes);
      ERR_clear_error();
      // Without SSL_MODE_ENABLE_PARTIAL_WRITE, into a memory buffer: all of it, or a failure.
      if (SSL_write(ssl_, data.data() + done, static_cast<int>(piece)) <= 0) {
        fail();
        return false;
      }
      done += piece;
      if (!drain(scratch)) {
        return false;
      }
    }
  }
  data.swap(scratch);
  return true;
}

// Appends what TLS has written to its output buffer to `out`, emptying the buffer.
bool Session::drain(std::string& out) noexcept {
  BIO* bio = SSL_get_wbio(ssl_);
  const std::size_t pending = BIO_ctrl_pending(bio);
  if (pending == 0) {
    return true;
  }
  const std::size_t at = out.size();
  try {
    out.resize(at + pending);
  } catch (const std::bad_alloc&) {
    return false;
  }
  // pending is at most a piece's records (or a handshake flight): far below INT_MAX.
  if (BIO_read(bio, out.data() + at, static_cast<int>(pending)) != static_cast<int>(pending)) {
    ERR_clear_error();
    out.resize(at);
    return false;
  }
  return true;
}

void Session::close() noexcept {
  if (state_ == State::kOpen) {
    ERR_clear_error();
    SSL_shutdown(ssl_);  // writes close_notify; the client's is not awaited
    ERR_clear_error();
  }
}

void Session::fail() noexcept {
  state_ = State::kFailed;
  ERR_clear_error();
}

}  // namespace tachyon::tls
