// Gateway API keys: who may call the gateway, and how much (issue 16).
//
// Keys look like "kvr-" + 43 base64url characters (32 random bytes). The
// keys file (`kvr_gateway --api_keys_file`, a Kubernetes Secret) never holds
// a key, only a salted hash of it:
//
//   {"keys": [{"id": "team-a", "salt": "<hex>", "sha256": "<hex>",
//              "max_concurrent": 8, "tokens_per_minute": 120000}]}
//
// sha256 = SHA-256(salt bytes || key bytes) (the key's bytes: the whole
// string, "kvr-" included); limits 0 or absent = unlimited.
//
// Lookup is O(1) and has no timing oracle across keys: the salt of a key is
// derived from the key itself, ApiKeySalt(key) = the first 16 bytes of
// SHA-256("kvr-apikey-salt:" || key), so a presented key gives its salt,
// the salt finds the one entry that can match (a hash map by salt), and one
// SHA-256 plus a constant-time compare (CRYPTO_memcmp) of 32 bytes decides.
// What the map lookup's timing can reveal is whether some stored salt is
// near ApiKeySalt(presented key): a hash of the attacker's own input, which
// says nothing usable about any stored key (finding a key from its salt or
// hash is a SHA-256 preimage over 256 random bits). Hashing the presented
// key with every entry's salt would cost O(keys) SHA-256s per request (an
// amplifier for anyone sending wrong keys). The salt still makes each
// file's hashes unique per key; with 256-bit random keys no dictionary or
// precomputed table applies anyway. Consequence: an entry must be made by
// MakeApiKey (`kvr apikey`); an entry with any other salt never matches.
//
// Per-key limits (ApiKeyStore::Admit / ApiKeyGrant):
//   * max_concurrent: requests of the key in flight at once (HTTP and gRPC
//     generation requests together); one more is refused ("requests").
//   * tokens_per_minute: a token bucket of capacity tokens_per_minute that
//     refills at tokens_per_minute / 60 per second. Each request debits its
//     prompt tokens once known and its completion tokens as they stream; a
//     request is admitted only while the bucket is above zero ("tokens"),
//     so a request running may overdraw it (down to -tokens_per_minute at
//     most), and the next waits until the refill pays that back. A token
//     bucket keeps O(1) state per key, refills continuously (no burst of
//     2x the limit at a window edge, as a fixed window allows) and lets a
//     quiet key spend up to a full minute's budget at once.
// Limit state lives per key id and survives reloads (a reload that changes
// a key's limits applies them to the same counters).
#pragma once

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"

namespace kvr::gateway {

// Bounds of a keys file (a hostile or broken Secret cannot exhaust memory).
inline constexpr int64_t kMaxApiKeysFileBytes = int64_t{1} << 20;  // 1 MiB
inline constexpr size_t kMaxApiKeys = 4096;
inline constexpr size_t kMaxApiKeyIdBytes = 64;   // [A-Za-z0-9._-], non-empty
inline constexpr size_t kMinApiKeySaltBytes = 16;
inline constexpr size_t kMaxApiKeySaltBytes = 64;
inline constexpr int64_t kMaxApiKeyConcurrent = 1000000;
inline constexpr int64_t kMaxApiKeyTokensPerMinute = int64_t{1} << 40;
// Distinct key ids that get a metrics label of their own; the others are
// counted under "other" (bounded cardinality).
inline constexpr size_t kMaxApiKeyMetricLabels = 64;

struct ApiKeyLimits {
  int64_t max_concurrent = 0;     // 0 = unlimited
  int64_t tokens_per_minute = 0;  // prompt + completion tokens; 0 = unlimited
};

// One entry of the keys file, decoded.
struct ApiKeyEntry {
  std::string id;
  std::string salt;    // raw bytes
  std::string sha256;  // raw 32 bytes
  ApiKeyLimits limits;
};

// Parses a keys file's text. InvalidArgument naming the entry, the field and
// the limit for anything off: size over kMaxApiKeysFileBytes, invalid JSON or
// nesting deeper than 4, not {"keys": [...]}, more than kMaxApiKeys entries,
// an id empty / too long / outside [A-Za-z0-9._-] / repeated, a salt or
// sha256 that is not hex of the right length, a repeated salt, a limit that
// is not an integer in [0, its maximum], an unknown field.
absl::StatusOr<std::vector<ApiKeyEntry>> ParseApiKeys(absl::string_view text);

// The salt MakeApiKey gives `key` (16 raw bytes; see the file comment).
std::string ApiKeySalt(absl::string_view key);

// Whether `key` has the form of a key: "kvr-" + 43 base64url characters.
bool IsApiKeyFormat(absl::string_view key);

struct MadeApiKey {
  std::string key;    // "kvr-..." (secret: give it to the client)
  std::string entry;  // its keys-file entry, one line of JSON (no secret)
};

// A new key for `id` (32 bytes from OpenSSL's CSPRNG) and its entry.
// InvalidArgument for an id or limits the file parser would refuse;
// Internal when the CSPRNG fails.
absl::StatusOr<MadeApiKey> MakeApiKey(absl::string_view id, ApiKeyLimits limits);

class ApiKeyStore;

// One key's limit state. Thread-safe.
class ApiKeyState {
 public:
  ApiKeyState(std::string id, std::string metric_label);
  const std::string& id() const { return id_; }
  // The key's metrics label: its id, or "other" beyond the label cap.
  const std::string& metric_label() const { return metric_label_; }

 private:
  friend class ApiKeyStore;
  friend class ApiKeyGrant;
  void SetLimitsLocked(ApiKeyLimits limits, absl::Time now);
  void RefillLocked(absl::Time now);

  const std::string id_;
  const std::string metric_label_;
  std::mutex mu_;
  ApiKeyLimits limits_;
  int64_t in_flight_ = 0;
  double bucket_ = 0;  // tokens available (negative: overdrawn)
  absl::Time refilled_ = absl::InfinitePast();
};

// A generation request admitted for a key: holds one of its max_concurrent
// slots until destroyed, and debits its tokens. Thread-safe.
class ApiKeyGrant {
 public:
  ApiKeyGrant(std::shared_ptr<ApiKeyState> state, std::function<absl::Time()> clock);
  ~ApiKeyGrant();
  ApiKeyGrant(const ApiKeyGrant&) = delete;
  ApiKeyGrant& operator=(const ApiKeyGrant&) = delete;

  const std::string& id() const { return state_->id(); }
  const std::string& metric_label() const { return state_->metric_label(); }
  // Takes `tokens` (>= 0) from the key's bucket (not below -capacity).
  void Debit(int64_t tokens);

 private:
  const std::shared_ptr<ApiKeyState> state_;
  const std::function<absl::Time()> clock_;
};

// What Authenticate / Admit decided.
struct ApiKeyDecision {
  enum class Outcome : uint8_t {
    kOk = 0,
    kMissing = 1,          // no Authorization: Bearer header (HTTP 401, code null)
    kInvalid = 2,          // wrong, revoked or malformed key (401 invalid_api_key)
    kTooManyRequests = 3,  // max_concurrent in flight (429 type "requests")
    kOutOfTokens = 4,      // tokens_per_minute spent (429 type "tokens")
  };
  Outcome outcome = Outcome::kOk;
  std::string key_id;       // known from kTooManyRequests on (never the key)
  std::string metric_label; // the key's metrics label, likewise
  std::string message;      // names the limit (never the key)
  int retry_after_seconds = 0;  // for the 429s, >= 1
  std::shared_ptr<ApiKeyGrant> grant;  // kOk from Admit only
};

struct ApiKeyStoreOptions {
  std::string path;                          // the keys file
  absl::Duration reload = absl::Seconds(5);  // poll period (stat: mtime, size, inode)
  // Tests: the clock of the token buckets.
  std::function<absl::Time()> clock = [] { return absl::Now(); };
  // Called after every load attempt at a reload (ok, keys then loaded, error).
  std::function<void(bool ok, size_t keys, const absl::Status& error)> on_reload;
};

// The keys of a keys file, re-read when it changes. Thread-safe.
class ApiKeyStore {
 public:
  // Loads `options.path` (the error names the file and the problem) and,
  // with a reload period above zero, starts polling it: a changed file is
  // parsed and replaces the keys; a bad one keeps the previous keys and is
  // logged (stderr, key ids only) and reported to on_reload.
  static absl::StatusOr<std::unique_ptr<ApiKeyStore>> Open(ApiKeyStoreOptions options);
  // From entries already parsed (no file, no polling): tests, tools.
  static std::unique_ptr<ApiKeyStore> FromEntries(std::vector<ApiKeyEntry> entries,
                                                  ApiKeyStoreOptions options);
  ~ApiKeyStore();  // stops the poller
  ApiKeyStore(const ApiKeyStore&) = delete;
  ApiKeyStore& operator=(const ApiKeyStore&) = delete;

  // Checks an Authorization header value ("Bearer <key>"; nullopt: no
  // header): kOk (key_id set), kMissing or kInvalid. For calls that take no
  // slot (Tokenize, /v1/models, ...).
  ApiKeyDecision Authenticate(std::optional<absl::string_view> authorization) const;
  // Authenticate, then the key's limits: kOk with a grant holding a slot,
  // or kTooManyRequests / kOutOfTokens.
  ApiKeyDecision Admit(std::optional<absl::string_view> authorization);

  // Re-reads the file now if it changed (what the poller does). Returns the
  // load's error (the previous keys kept) or OK (also when unchanged).
  absl::Status ReloadIfChanged();
  size_t size() const;

 private:
  struct Keys;
  struct FileStamp {
    int64_t mtime_ns = 0;
    int64_t size = -1;
    uint64_t inode = 0;
    uint64_t device = 0;
    bool operator==(const FileStamp&) const = default;
  };
  explicit ApiKeyStore(ApiKeyStoreOptions options);
  // `path`'s stamp now (stat follows symlinks: a Secret's ..data swap
  // changes the inode); NotFound when it cannot be stat'ed.
  static absl::StatusOr<FileStamp> StampOf(const std::string& path);
  void Install(std::vector<ApiKeyEntry> entries);
  // The state of `id` (created with a metrics label on first sight).
  std::shared_ptr<ApiKeyState> StateLocked(const std::string& id);
  // Authenticate's work; on kOk also the key's state.
  ApiKeyDecision Lookup(std::optional<absl::string_view> authorization,
                        std::shared_ptr<ApiKeyState>* state) const;

  const ApiKeyStoreOptions options_;
  mutable std::mutex mu_;
  std::shared_ptr<const Keys> keys_;  // swapped whole at a reload
  std::map<std::string, std::shared_ptr<ApiKeyState>> states_;  // ids of keys_
  std::set<std::string> labelled_;  // ids given a metrics label of their own
  FileStamp stamp_;

  std::mutex poll_mu_;
  std::condition_variable poll_cv_;
  bool stop_ = false;
  std::thread poller_;
};

}  // namespace kvr::gateway
