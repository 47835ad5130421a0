#include "services/gateway/api_keys.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstring>
#include <cstdio>
#include <fstream>
#include <limits>
#include <sstream>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "nlohmann/json.hpp"

namespace kvr::gateway {
namespace {

using nlohmann::json;

constexpr char kKeyPrefix[] = "kvr-";
constexpr size_t kKeyRandomBytes = 32;
constexpr size_t kKeyBodyChars = 43;  // base64url of 32 bytes, no padding
constexpr size_t kSaltBytes = 16;
constexpr char kSaltTag[] = "kvr-apikey-salt:";
constexpr int kMaxFileDepth = 4;  // {"keys": [{...}]} is 3

// SHA-256 of the concatenation of `parts` (OpenSSL EVP), 32 raw bytes.
std::string Sha256(std::initializer_list<absl::string_view> parts) {
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  EVP_MD_CTX* ctx = EVP_MD_CTX_new();
  bool ok = ctx != nullptr && EVP_DigestInit_ex(ctx, EVP_sha256(), nullptr) == 1;
  for (absl::string_view p : parts) {
    ok = ok && EVP_DigestUpdate(ctx, p.data(), p.size()) == 1;
  }
  ok = ok && EVP_DigestFinal_ex(ctx, digest, &len) == 1;
  EVP_MD_CTX_free(ctx);
  if (!ok || len != 32) {
    // Only an OpenSSL without SHA-256 (or out of memory) gets here: no key
    // can be checked, so none is accepted (an empty digest matches nothing).
    return std::string();
  }
  return std::string(reinterpret_cast<const char*>(digest), len);
}

bool IsIdChar(char c) {
  return absl::ascii_isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '_' || c == '-';
}

absl::Status CheckId(absl::string_view id) {
  if (id.empty() || id.size() > kMaxApiKeyIdBytes) {
    return absl::InvalidArgumentError(absl::StrCat("id: length ", id.size(), " outside [1, ",
                                                   kMaxApiKeyIdBytes, "]"));
  }
  if (!std::all_of(id.begin(), id.end(), IsIdChar)) {
    return absl::InvalidArgumentError("id: only A-Z a-z 0-9 . _ - allowed");
  }
  return absl::OkStatus();
}

absl::Status CheckLimits(const ApiKeyLimits& l) {
  if (l.max_concurrent < 0 || l.max_concurrent > kMaxApiKeyConcurrent) {
    return absl::InvalidArgumentError(absl::StrCat(
        "max_concurrent: ", l.max_concurrent, " outside [0, ", kMaxApiKeyConcurrent, "]"));
  }
  if (l.tokens_per_minute < 0 || l.tokens_per_minute > kMaxApiKeyTokensPerMinute) {
    return absl::InvalidArgumentError(absl::StrCat("tokens_per_minute: ", l.tokens_per_minute,
                                                   " outside [0, ", kMaxApiKeyTokensPerMinute,
                                                   "]"));
  }
  return absl::OkStatus();
}

// Lower-case or upper-case hex of `min_bytes`..`max_bytes` bytes → raw.
absl::StatusOr<std::string> DecodeHex(absl::string_view field, const json& v, size_t min_bytes,
                                      size_t max_bytes) {
  if (!v.is_string()) return absl::InvalidArgumentError(absl::StrCat(field, ": not a string"));
  const std::string& hex = v.get_ref<const std::string&>();
  if (hex.size() % 2 != 0 || hex.size() < 2 * min_bytes || hex.size() > 2 * max_bytes ||
      !std::all_of(hex.begin(), hex.end(),
                   [](char c) { return absl::ascii_isxdigit(static_cast<unsigned char>(c)); })) {
    return absl::InvalidArgumentError(
        min_bytes == max_bytes
            ? absl::StrCat(field, ": expected ", 2 * min_bytes, " hex digits (", min_bytes,
                           " bytes)")
            : absl::StrCat(field, ": expected hex of ", min_bytes, " to ", max_bytes, " bytes"));
  }
  return absl::HexStringToBytes(hex);
}

absl::StatusOr<int64_t> Limit(const json& entry, const char* field, int64_t max) {
  auto it = entry.find(field);
  if (it == entry.end() || it->is_null()) return 0;
  if (!it->is_number_integer()) {
    return absl::InvalidArgumentError(absl::StrCat(field, ": not an integer"));
  }
  if (it->is_number_unsigned()) {
    const uint64_t u = it->get<uint64_t>();
    if (u > static_cast<uint64_t>(max)) {
      return absl::InvalidArgumentError(absl::StrCat(field, ": ", u, " outside [0, ", max, "]"));
    }
    return static_cast<int64_t>(u);
  }
  const int64_t v = it->get<int64_t>();
  if (v < 0 || v > max) {
    return absl::InvalidArgumentError(absl::StrCat(field, ": ", v, " outside [0, ", max, "]"));
  }
  return v;
}

// The nesting-depth guard of the parse: thrown from the parser's callback.
struct TooDeep {};

absl::StatusOr<ApiKeyEntry> ParseEntry(const json& e) {
  if (!e.is_object()) return absl::InvalidArgumentError("not an object");
  for (auto it = e.begin(); it != e.end(); ++it) {
    const std::string& k = it.key();
    if (k != "id" && k != "salt" && k != "sha256" && k != "max_concurrent" &&
        k != "tokens_per_minute") {
      return absl::InvalidArgumentError(
          absl::StrCat("unknown field \"", absl::CEscape(k.substr(0, 64)),
                       "\" (id, salt, sha256, max_concurrent, tokens_per_minute)"));
    }
  }
  ApiKeyEntry out;
  auto id = e.find("id");
  if (id == e.end() || !id->is_string()) return absl::InvalidArgumentError("id: missing or not a string");
  out.id = id->get<std::string>();
  if (absl::Status s = CheckId(out.id); !s.ok()) return s;
  auto salt = e.find("salt");
  if (salt == e.end()) return absl::InvalidArgumentError("salt: missing");
  absl::StatusOr<std::string> raw_salt =
      DecodeHex("salt", *salt, kMinApiKeySaltBytes, kMaxApiKeySaltBytes);
  if (!raw_salt.ok()) return raw_salt.status();
  out.salt = *std::move(raw_salt);
  auto hash = e.find("sha256");
  if (hash == e.end()) return absl::InvalidArgumentError("sha256: missing");
  absl::StatusOr<std::string> raw_hash = DecodeHex("sha256", *hash, 32, 32);
  if (!raw_hash.ok()) return raw_hash.status();
  out.sha256 = *std::move(raw_hash);
  absl::StatusOr<int64_t> mc = Limit(e, "max_concurrent", kMaxApiKeyConcurrent);
  if (!mc.ok()) return mc.status();
  absl::StatusOr<int64_t> tpm = Limit(e, "tokens_per_minute", kMaxApiKeyTokensPerMinute);
  if (!tpm.ok()) return tpm.status();
  out.limits = {*mc, *tpm};
  return out;
}

// The key of an Authorization header value "Bearer <key>" (scheme
// case-insensitive); nullopt when the header is not Bearer auth.
std::optional<absl::string_view> BearerToken(absl::string_view header) {
  header = absl::StripAsciiWhitespace(header);
  constexpr absl::string_view kScheme = "bearer ";
  if (header.size() < kScheme.size() || !absl::StartsWithIgnoreCase(header, kScheme)) {
    return std::nullopt;
  }
  absl::string_view token = absl::StripLeadingAsciiWhitespace(header.substr(kScheme.size()));
  if (token.empty()) return std::nullopt;
  return token;
}

int RetryAfterSeconds(double seconds) {
  if (!(seconds > 1)) return 1;
  if (seconds > 3600) return 3600;
  return static_cast<int>(std::ceil(seconds));
}

}  // namespace

absl::StatusOr<std::vector<ApiKeyEntry>> ParseApiKeys(absl::string_view text) {
  if (static_cast<int64_t>(text.size()) > kMaxApiKeysFileBytes) {
    return absl::InvalidArgumentError(absl::StrCat("keys file: ", text.size(),
                                                   " bytes, over the limit of ",
                                                   kMaxApiKeysFileBytes));
  }
  json doc;
  try {
    doc = json::parse(text.begin(), text.end(),
                      [](int depth, json::parse_event_t, json&) -> bool {
                        if (depth > kMaxFileDepth) throw TooDeep{};
                        return true;
                      });
  } catch (const TooDeep&) {
    return absl::InvalidArgumentError(
        absl::StrCat("keys file: JSON nested deeper than ", kMaxFileDepth, " levels"));
  } catch (const json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat("keys file: invalid JSON (", e.what(), ")"));
  }
  if (!doc.is_object() || !doc.contains("keys") || !doc["keys"].is_array()) {
    return absl::InvalidArgumentError("keys file: expected {\"keys\": [...]}");
  }
  const json& keys = doc["keys"];
  if (keys.size() > kMaxApiKeys) {
    return absl::InvalidArgumentError(absl::StrCat("keys file: ", keys.size(),
                                                   " keys, over the limit of ", kMaxApiKeys));
  }
  std::vector<ApiKeyEntry> out;
  out.reserve(keys.size());
  std::set<std::string> ids, salts;
  for (size_t i = 0; i < keys.size(); ++i) {
    absl::StatusOr<ApiKeyEntry> e = ParseEntry(keys[i]);
    if (!e.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("keys file: keys[", i, "]: ", e.status().message()));
    }
    if (!ids.insert(e->id).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("keys file: keys[", i, "]: id \"", e->id, "\" repeated"));
    }
    if (!salts.insert(e->salt).second) {
      return absl::InvalidArgumentError(absl::StrCat("keys file: keys[", i, "] (id \"", e->id,
                                                     "\"): salt repeated"));
    }
    out.push_back(*std::move(e));
  }
  return out;
}

std::string ApiKeySalt(absl::string_view key) {
  return Sha256({kSaltTag, key}).substr(0, kSaltBytes);
}

bool IsApiKeyFormat(absl::string_view key) {
  if (key.size() != sizeof(kKeyPrefix) - 1 + kKeyBodyChars || !absl::StartsWith(key, kKeyPrefix)) {
    return false;
  }
  return std::all_of(key.begin() + 4, key.end(), [](char c) {
    return absl::ascii_isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_';
  });
}

absl::StatusOr<MadeApiKey> MakeApiKey(absl::string_view id, ApiKeyLimits limits) {
  if (absl::Status s = CheckId(id); !s.ok()) return s;
  if (absl::Status s = CheckLimits(limits); !s.ok()) return s;
  unsigned char random[kKeyRandomBytes];
  if (RAND_bytes(random, sizeof(random)) != 1) {
    return absl::InternalError("RAND_bytes failed: no key made");
  }
  MadeApiKey out;
  out.key = absl::StrCat(
      kKeyPrefix,
      absl::WebSafeBase64Escape(absl::string_view(reinterpret_cast<const char*>(random),
                                                  sizeof(random))));
  OPENSSL_cleanse(random, sizeof(random));
  const std::string salt = ApiKeySalt(out.key);
  json entry = {{"id", std::string(id)},
                {"salt", absl::BytesToHexString(salt)},
                {"sha256", absl::BytesToHexString(Sha256({salt, out.key}))},
                {"max_concurrent", limits.max_concurrent},
                {"tokens_per_minute", limits.tokens_per_minute}};
  out.entry = entry.dump();
  return out;
}

// ---------------------------------------------------------------------------
// Limit state.

ApiKeyState::ApiKeyState(std::string id, std::string metric_label)
    : id_(std::move(id)), metric_label_(std::move(metric_label)) {}

void ApiKeyState::RefillLocked(absl::Time now) {
  if (limits_.tokens_per_minute <= 0) return;
  const double capacity = static_cast<double>(limits_.tokens_per_minute);
  const double elapsed = std::max(0.0, absl::ToDoubleSeconds(now - refilled_));
  bucket_ = std::min(capacity, bucket_ + elapsed * capacity / 60.0);
  refilled_ = now;
}

void ApiKeyState::SetLimitsLocked(ApiKeyLimits limits, absl::Time now) {
  RefillLocked(now);
  const bool was_limited = limits_.tokens_per_minute > 0;
  limits_ = limits;
  const double capacity = static_cast<double>(limits.tokens_per_minute);
  if (!was_limited) {
    bucket_ = capacity;  // new, or newly limited: a full minute's budget
  } else {
    bucket_ = std::clamp(bucket_, -capacity, capacity);
  }
  refilled_ = now;
}

ApiKeyGrant::ApiKeyGrant(std::shared_ptr<ApiKeyState> state, std::function<absl::Time()> clock)
    : state_(std::move(state)), clock_(std::move(clock)) {}

ApiKeyGrant::~ApiKeyGrant() {
  std::lock_guard<std::mutex> lock(state_->mu_);
  --state_->in_flight_;
}

void ApiKeyGrant::Debit(int64_t tokens) {
  if (tokens <= 0) return;
  std::lock_guard<std::mutex> lock(state_->mu_);
  if (state_->limits_.tokens_per_minute <= 0) return;
  state_->RefillLocked(clock_());
  const double capacity = static_cast<double>(state_->limits_.tokens_per_minute);
  state_->bucket_ = std::max(-capacity, state_->bucket_ - static_cast<double>(tokens));
}

// ---------------------------------------------------------------------------
// The store.

struct ApiKeyStore::Keys {
  struct Entry {
    std::string id;
    std::string sha256;
  };
  std::unordered_map<std::string, Entry> by_salt;
};

ApiKeyStore::ApiKeyStore(ApiKeyStoreOptions options) : options_(std::move(options)) {}

ApiKeyStore::~ApiKeyStore() {
  {
    std::lock_guard<std::mutex> lock(poll_mu_);
    stop_ = true;
  }
  poll_cv_.notify_all();
  if (poller_.joinable()) poller_.join();
}

std::unique_ptr<ApiKeyStore> ApiKeyStore::FromEntries(std::vector<ApiKeyEntry> entries,
                                                      ApiKeyStoreOptions options) {
  auto store = std::unique_ptr<ApiKeyStore>(new ApiKeyStore(std::move(options)));
  store->Install(std::move(entries));
  return store;
}

namespace {

// The contents of `path`, at most kMaxApiKeysFileBytes (more is an error
// naming the limit; the bytes past it are never read).
absl::Status ReadKeysFile(const std::string& path, std::string* text) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat(path, ": cannot open"));
  text->assign(static_cast<size_t>(kMaxApiKeysFileBytes) + 1, '\0');
  in.read(text->data(), static_cast<std::streamsize>(text->size()));
  text->resize(static_cast<size_t>(in.gcount()));
  if (static_cast<int64_t>(text->size()) > kMaxApiKeysFileBytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        path, ": over the limit of ", kMaxApiKeysFileBytes, " bytes"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<ApiKeyStore::FileStamp> ApiKeyStore::StampOf(const std::string& path) {
  struct stat st {};
  if (stat(path.c_str(), &st) != 0) {
    return absl::NotFoundError(absl::StrCat(path, ": cannot stat (", std::strerror(errno), ")"));
  }
  return FileStamp{static_cast<int64_t>(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec,
                   static_cast<int64_t>(st.st_size), static_cast<uint64_t>(st.st_ino),
                   static_cast<uint64_t>(st.st_dev)};
}

absl::StatusOr<std::unique_ptr<ApiKeyStore>> ApiKeyStore::Open(ApiKeyStoreOptions options) {
  auto store = std::unique_ptr<ApiKeyStore>(new ApiKeyStore(std::move(options)));
  const std::string& path = store->options_.path;
  absl::StatusOr<FileStamp> stamp = StampOf(path);
  if (!stamp.ok()) return stamp.status();
  if (stamp->size > kMaxApiKeysFileBytes) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": ", stamp->size,
                                                   " bytes, over the limit of ",
                                                   kMaxApiKeysFileBytes));
  }
  std::string text;
  if (absl::Status s = ReadKeysFile(path, &text); !s.ok()) return s;
  absl::StatusOr<std::vector<ApiKeyEntry>> entries = ParseApiKeys(text);
  if (!entries.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": ", entries.status().message()));
  }
  store->stamp_ = *stamp;
  store->Install(*std::move(entries));
  if (store->options_.reload > absl::ZeroDuration()) {
    ApiKeyStore* self = store.get();
    store->poller_ = std::thread([self] {
      std::unique_lock<std::mutex> lock(self->poll_mu_);
      const auto period = std::chrono::nanoseconds(absl::ToInt64Nanoseconds(self->options_.reload));
      while (!self->poll_cv_.wait_for(lock, period, [self] { return self->stop_; })) {
        lock.unlock();
        self->ReloadIfChanged().IgnoreError();
        lock.lock();
      }
    });
  }
  return store;
}

absl::Status ApiKeyStore::ReloadIfChanged() {
  // A stat per poll; the file is read only when its stamp changed.
  const FileStamp unreadable{0, -2, 0, 0};
  absl::StatusOr<FileStamp> stamp = StampOf(options_.path);
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stamp.ok() && *stamp == stamp_) return absl::OkStatus();  // unchanged
    // A file that cannot be stat'ed is reported once, not at every poll.
    if (!stamp.ok() && stamp_ == unreadable) return stamp.status();
    stamp_ = stamp.ok() ? *stamp : unreadable;
  }
  std::string text;
  absl::Status read = stamp.status();
  if (read.ok()) read = ReadKeysFile(options_.path, &text);
  absl::StatusOr<std::vector<ApiKeyEntry>> entries =
      read.ok() ? ParseApiKeys(text) : absl::StatusOr<std::vector<ApiKeyEntry>>(read);
  if (!entries.ok()) {
    std::fprintf(stderr, "kvr_gateway: api keys: %s: %s; keeping the %zu keys loaded before\n",
                 options_.path.c_str(), std::string(entries.status().message()).c_str(), size());
    if (options_.on_reload) options_.on_reload(false, size(), entries.status());
    return entries.status();
  }
  Install(*std::move(entries));
  if (options_.on_reload) options_.on_reload(true, size(), absl::OkStatus());
  return absl::OkStatus();
}

std::shared_ptr<ApiKeyState> ApiKeyStore::StateLocked(const std::string& id) {
  auto it = states_.find(id);
  if (it != states_.end()) return it->second;
  std::string label = "other";
  if (labelled_.count(id) > 0 || labelled_.size() < kMaxApiKeyMetricLabels) {
    labelled_.insert(id);
    label = id;
  }
  auto state = std::make_shared<ApiKeyState>(id, std::move(label));
  states_.emplace(id, state);
  return state;
}

void ApiKeyStore::Install(std::vector<ApiKeyEntry> entries) {
  auto keys = std::make_shared<Keys>();
  std::vector<std::string> ids;
  const absl::Time now = options_.clock();
  std::lock_guard<std::mutex> lock(mu_);
  std::map<std::string, std::shared_ptr<ApiKeyState>> states;
  for (ApiKeyEntry& e : entries) {
    std::shared_ptr<ApiKeyState> state = StateLocked(e.id);
    {
      std::lock_guard<std::mutex> state_lock(state->mu_);
      state->SetLimitsLocked(e.limits, now);
    }
    states.emplace(e.id, std::move(state));
    ids.push_back(e.id);
    keys->by_salt.emplace(std::move(e.salt), Keys::Entry{std::move(e.id), std::move(e.sha256)});
  }
  // Removed keys' states go (requests in flight keep theirs until they end).
  states_ = std::move(states);
  keys_ = std::move(keys);
  // Ids only (never keys or hashes); the first few, so the line stays short.
  constexpr size_t kLoggedIds = 16;
  const size_t shown = std::min(ids.size(), kLoggedIds);
  std::fprintf(stderr, "kvr_gateway: api keys: %zu loaded (ids: %s%s)\n", ids.size(),
               absl::StrJoin(ids.begin(), ids.begin() + static_cast<ptrdiff_t>(shown), ", ").c_str(),
               ids.size() > shown ? ", ..." : "");
}

size_t ApiKeyStore::size() const {
  std::lock_guard<std::mutex> lock(mu_);
  return keys_ == nullptr ? 0 : keys_->by_salt.size();
}

ApiKeyDecision ApiKeyStore::Lookup(std::optional<absl::string_view> authorization,
                                   std::shared_ptr<ApiKeyState>* state) const {
  using Outcome = ApiKeyDecision::Outcome;
  ApiKeyDecision d;
  // No header, or one that is not Bearer auth: no key was provided.
  std::optional<absl::string_view> key;
  if (authorization.has_value()) key = BearerToken(*authorization);
  if (!key.has_value()) {
    d.outcome = Outcome::kMissing;
    d.message =
        "You didn't provide an API key. You need to provide your API key in an Authorization "
        "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)";
    return d;
  }
  d.outcome = Outcome::kInvalid;
  d.message = "Incorrect API key provided";
  if (!IsApiKeyFormat(*key)) return d;
  const std::string salt = ApiKeySalt(*key);
  std::shared_ptr<const Keys> keys;
  {
    std::lock_guard<std::mutex> lock(mu_);
    keys = keys_;
  }
  if (keys == nullptr) return d;
  auto it = keys->by_salt.find(salt);
  if (it == keys->by_salt.end()) return d;
  const std::string digest = Sha256({salt, *key});
  if (digest.size() != it->second.sha256.size() ||
      CRYPTO_memcmp(digest.data(), it->second.sha256.data(), digest.size()) != 0) {
    return d;
  }
  std::lock_guard<std::mutex> lock(mu_);
  auto s = states_.find(it->second.id);
  if (s == states_.end()) return d;  // revoked by a reload just now
  d.outcome = Outcome::kOk;
  d.message.clear();
  d.key_id = s->second->id();
  d.metric_label = s->second->metric_label();
  if (state != nullptr) *state = s->second;
  return d;
}

ApiKeyDecision ApiKeyStore::Authenticate(std::optional<absl::string_view> authorization) const {
  return Lookup(authorization, nullptr);
}

ApiKeyDecision ApiKeyStore::Admit(std::optional<absl::string_view> authorization) {
  using Outcome = ApiKeyDecision::Outcome;
  std::shared_ptr<ApiKeyState> state;
  ApiKeyDecision d = Lookup(authorization, &state);
  if (d.outcome != Outcome::kOk) return d;
  const absl::Time now = options_.clock();
  std::lock_guard<std::mutex> lock(state->mu_);
  const ApiKeyLimits& l = state->limits_;
  if (l.max_concurrent > 0 && state->in_flight_ >= l.max_concurrent) {
    d.outcome = Outcome::kTooManyRequests;
    d.message = absl::StrCat("Rate limit reached for key ", state->id(),
                             " on concurrent requests (max_concurrent): limit ", l.max_concurrent,
                             ", in flight ", state->in_flight_,
                             ". Please try again once a request has finished.");
    d.retry_after_seconds = 1;
    return d;
  }
  if (l.tokens_per_minute > 0) {
    state->RefillLocked(now);
    if (state->bucket_ <= 0) {
      const double rate = static_cast<double>(l.tokens_per_minute) / 60.0;
      // Back at zero after this long; admitted once above it.
      const double wait = -state->bucket_ / rate;
      d.outcome = Outcome::kOutOfTokens;
      d.retry_after_seconds = RetryAfterSeconds(wait);
      d.message = absl::StrCat("Rate limit reached for key ", state->id(),
                               " on tokens per min (tokens_per_minute): limit ",
                               l.tokens_per_minute, ", available ",
                               static_cast<int64_t>(std::floor(state->bucket_)),
                               ". Please try again in ", d.retry_after_seconds, "s.");
      return d;
    }
  }
  ++state->in_flight_;
  d.grant = std::make_shared<ApiKeyGrant>(state, options_.clock);
  return d;
}

}  // namespace kvr::gateway
