// services/gateway/api_keys.h without a server: the key format and the
// entry MakeApiKey writes authenticate that key and no other; every bound of
// the keys file is refused with a message naming the field and the limit;
// max_concurrent and the tokens_per_minute bucket (exact numbers on a fake
// clock); reloads (new key in, old key out, a bad file keeps the keys, limit
// state kept across reloads); bounded metrics labels.
#include "services/gateway/api_keys.h"

#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "gtest/gtest.h"
#include "tests/support/temp_dir.h"

namespace kvr::gateway {
namespace {

using Outcome = ApiKeyDecision::Outcome;

std::string Bearer(const std::string& key) { return "Bearer " + key; }

// A keys file of `entries` (JSON objects, one per key).
std::string KeysFile(const std::vector<std::string>& entries) {
  return absl::StrCat("{\"keys\": [", absl::StrJoin(entries, ","), "]}");
}

// Writes `text` to `path` atomically (a new inode, as a Secret update does).
void WriteFile(const std::string& path, const std::string& text) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::trunc);
    out << text;
  }
  std::filesystem::rename(tmp, path);
}

std::unique_ptr<ApiKeyStore> StoreOf(const std::vector<std::string>& entries,
                                     std::function<absl::Time()> clock = nullptr) {
  absl::StatusOr<std::vector<ApiKeyEntry>> parsed = ParseApiKeys(KeysFile(entries));
  EXPECT_TRUE(parsed.ok()) << parsed.status();
  ApiKeyStoreOptions o;
  if (clock) o.clock = std::move(clock);
  return ApiKeyStore::FromEntries(parsed.ok() ? *parsed : std::vector<ApiKeyEntry>{}, o);
}

TEST(ApiKeysTest, MadeKeyAuthenticatesAndNothingElseDoes) {
  absl::StatusOr<MadeApiKey> a = MakeApiKey("team-a", {2, 1000});
  absl::StatusOr<MadeApiKey> b = MakeApiKey("team-b", {});
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(a->key.size(), 4u + 43u);
  EXPECT_EQ(a->key.substr(0, 4), "kvr-");
  EXPECT_TRUE(IsApiKeyFormat(a->key));
  EXPECT_NE(a->key, b->key);
  // The entry holds no part of the key.
  EXPECT_EQ(a->entry.find(a->key.substr(4)), std::string::npos);
  EXPECT_EQ(a->entry.find(a->key.substr(4, 16)), std::string::npos);

  auto store = StoreOf({a->entry, b->entry});
  ASSERT_EQ(store->size(), 2u);
  ApiKeyDecision d = store->Authenticate(Bearer(a->key));
  EXPECT_EQ(d.outcome, Outcome::kOk);
  EXPECT_EQ(d.key_id, "team-a");
  EXPECT_EQ(store->Authenticate("bearer  " + b->key).key_id, "team-b");  // scheme is case-blind

  // One character off, another key's shape, no key, not Bearer.
  std::string wrong = a->key;
  wrong.back() = wrong.back() == 'A' ? 'B' : 'A';
  EXPECT_EQ(store->Authenticate(Bearer(wrong)).outcome, Outcome::kInvalid);
  EXPECT_EQ(store->Authenticate(Bearer(wrong)).message, "Incorrect API key provided");
  EXPECT_EQ(store->Authenticate(Bearer(a->key + "x")).outcome, Outcome::kInvalid);
  EXPECT_EQ(store->Authenticate(Bearer("sk-" + a->key.substr(3))).outcome, Outcome::kInvalid);
  EXPECT_EQ(store->Authenticate(std::nullopt).outcome, Outcome::kMissing);
  EXPECT_EQ(store->Authenticate("Basic dXNlcjpwYXNz").outcome, Outcome::kMissing);
  EXPECT_EQ(store->Authenticate("Bearer ").outcome, Outcome::kMissing);
  EXPECT_NE(store->Authenticate(std::nullopt).message.find("Authorization"), std::string::npos);

  // The entry's hash is SHA-256(salt || key) with the key-derived salt: a
  // hand-made entry with another salt and the right hash of it never matches.
  absl::StatusOr<std::vector<ApiKeyEntry>> parsed = ParseApiKeys(KeysFile({a->entry}));
  ASSERT_TRUE(parsed.ok());
  EXPECT_EQ((*parsed)[0].salt, ApiKeySalt(a->key));
  EXPECT_EQ((*parsed)[0].limits.max_concurrent, 2);
  EXPECT_EQ((*parsed)[0].limits.tokens_per_minute, 1000);
}

TEST(ApiKeysTest, MakeApiKeyRefusesWhatTheParserWould) {
  EXPECT_FALSE(MakeApiKey("", {}).ok());
  EXPECT_FALSE(MakeApiKey(std::string(65, 'a'), {}).ok());
  EXPECT_TRUE(MakeApiKey(std::string(64, 'a'), {}).ok());
  EXPECT_FALSE(MakeApiKey("a b", {}).ok());
  EXPECT_FALSE(MakeApiKey("a\"b", {}).ok());
  EXPECT_FALSE(MakeApiKey("a", {-1, 0}).ok());
  EXPECT_FALSE(MakeApiKey("a", {0, kMaxApiKeyTokensPerMinute + 1}).ok());
}

TEST(ApiKeysTest, FileBoundsNameTheFieldAndLimit) {
  const std::string salt(32, 'a'), hash(64, 'b');
  auto entry = [&](const std::string& fields) {
    return absl::StrCat("{\"id\": \"k\", \"salt\": \"", salt, "\", \"sha256\": \"", hash, "\"",
                        fields, "}");
  };
  ASSERT_TRUE(ParseApiKeys(KeysFile({entry("")})).ok());
  ASSERT_TRUE(ParseApiKeys(KeysFile({})).ok());
  struct Case {
    std::string text;
    std::string message;  // a part of the error
  };
  std::string many;
  {
    std::vector<std::string> entries;
    for (size_t i = 0; i <= kMaxApiKeys; ++i) {
      char s[33];
      std::snprintf(s, sizeof(s), "%032zx", i);
      entries.push_back(absl::StrCat("{\"id\": \"k", i, "\", \"salt\": \"", s, "\", \"sha256\": \"",
                                     hash, "\"}"));
    }
    many = KeysFile(entries);
  }
  const std::vector<Case> cases = {
      {"{", "invalid JSON"},
      {"[]", "expected {\"keys\": [...]}"},
      {"{\"keys\": {}}", "expected {\"keys\": [...]}"},
      {"{\"keys\": [[[[[]]]]]}", "nested deeper than 4"},
      {std::string(600000, '[') + std::string(600000, ']'), "over the limit of 1048576"},
      {KeysFile({"1"}), "keys[0]: not an object"},
      {KeysFile({"{\"salt\": \"" + salt + "\"}"}), "keys[0]: id: missing"},
      {KeysFile({absl::StrCat("{\"id\": \"", std::string(65, 'x'), "\", \"salt\": \"", salt,
                              "\", \"sha256\": \"", hash, "\"}")}),
       "id: length 65 outside [1, 64]"},
      {KeysFile({"{\"id\": \"a/b\"}"}), "id: only A-Z a-z 0-9 . _ - allowed"},
      {KeysFile({"{\"id\": \"k\", \"sha256\": \"" + hash + "\"}"}), "salt: missing"},
      {KeysFile({absl::StrCat("{\"id\": \"k\", \"salt\": \"", std::string(30, 'a'),
                              "\", \"sha256\": \"", hash, "\"}")}),
       "salt: expected hex of 16 to 64 bytes"},
      {KeysFile({absl::StrCat("{\"id\": \"k\", \"salt\": \"", std::string(32, 'g'),
                              "\", \"sha256\": \"", hash, "\"}")}),
       "salt: expected hex of 16 to 64 bytes"},
      {KeysFile({absl::StrCat("{\"id\": \"k\", \"salt\": \"", salt, "\", \"sha256\": \"",
                              std::string(62, 'b'), "\"}")}),
       "sha256: expected 64 hex digits (32 bytes)"},
      {KeysFile({entry(", \"max_concurrent\": -1")}), "max_concurrent: -1 outside [0, 1000000]"},
      {KeysFile({entry(", \"max_concurrent\": 1000001")}), "max_concurrent: 1000001 outside"},
      {KeysFile({entry(", \"tokens_per_minute\": 1.5")}), "tokens_per_minute: not an integer"},
      {KeysFile({entry(", \"tokens_per_minute\": 18446744073709551615")}),
       "tokens_per_minute: 18446744073709551615 outside [0, 1099511627776]"},
      {KeysFile({entry(", \"key\": \"x\"")}), "unknown field \"key\""},
      {KeysFile({entry(""), entry("")}), "keys[1]: id \"k\" repeated"},
      {KeysFile({entry(""), absl::StrCat("{\"id\": \"k2\", \"salt\": \"", salt,
                                         "\", \"sha256\": \"", hash, "\"}")}),
       "keys[1] (id \"k2\"): salt repeated"},
      {many, "4097 keys, over the limit of 4096"},
  };
  for (const Case& c : cases) {
    absl::StatusOr<std::vector<ApiKeyEntry>> r = ParseApiKeys(c.text);
    ASSERT_FALSE(r.ok()) << c.text.substr(0, 200);
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(r.status().message().find(c.message), std::string::npos)
        << r.status().message() << " (wanted: " << c.message << ")";
  }
}

TEST(ApiKeysTest, MaxConcurrentCountsGrantsInFlight) {
  absl::StatusOr<MadeApiKey> a = MakeApiKey("a", {2, 0});
  ASSERT_TRUE(a.ok());
  auto store = StoreOf({a->entry});
  ApiKeyDecision first = store->Admit(Bearer(a->key));
  ApiKeyDecision second = store->Admit(Bearer(a->key));
  ASSERT_EQ(first.outcome, Outcome::kOk);
  ASSERT_EQ(second.outcome, Outcome::kOk);
  ASSERT_NE(first.grant, nullptr);
  const ApiKeyDecision third = store->Admit(Bearer(a->key));
  EXPECT_EQ(third.outcome, Outcome::kTooManyRequests);
  EXPECT_EQ(third.key_id, "a");
  EXPECT_EQ(third.retry_after_seconds, 1);
  EXPECT_NE(third.message.find("max_concurrent): limit 2, in flight 2"), std::string::npos)
      << third.message;
  EXPECT_EQ(third.message.find(a->key), std::string::npos);
  first.grant.reset();
  EXPECT_EQ(store->Admit(Bearer(a->key)).outcome, Outcome::kOk);  // freed, and freed again
}

TEST(ApiKeysTest, TokenBucketRefillsAtTheLimitPerMinute) {
  absl::Time now = absl::FromUnixSeconds(1000000);
  absl::StatusOr<MadeApiKey> a = MakeApiKey("a", {0, 600});  // 10 tokens / s
  ASSERT_TRUE(a.ok());
  auto store = StoreOf({a->entry}, [&now] { return now; });
  ApiKeyDecision d = store->Admit(Bearer(a->key));
  ASSERT_EQ(d.outcome, Outcome::kOk);
  d.grant->Debit(599);  // 1 left: still admitted
  ApiKeyDecision d2 = store->Admit(Bearer(a->key));
  ASSERT_EQ(d2.outcome, Outcome::kOk);
  d2.grant->Debit(51);  // -50: overdrawn by a request that ran on
  const ApiKeyDecision refused = store->Admit(Bearer(a->key));
  EXPECT_EQ(refused.outcome, Outcome::kOutOfTokens);
  EXPECT_EQ(refused.retry_after_seconds, 5);  // 50 tokens at 10 / s
  EXPECT_NE(refused.message.find("tokens_per_minute): limit 600, available -50"),
            std::string::npos)
      << refused.message;
  EXPECT_NE(refused.message.find("try again in 5s"), std::string::npos) << refused.message;
  now += absl::Milliseconds(4900);  // -1
  EXPECT_EQ(store->Admit(Bearer(a->key)).outcome, Outcome::kOutOfTokens);
  now += absl::Milliseconds(200);  // +1
  EXPECT_EQ(store->Admit(Bearer(a->key)).outcome, Outcome::kOk);
  // Overdraft stops at one minute's budget; the refill stops at the capacity.
  d.grant->Debit(1000000);
  EXPECT_EQ(store->Admit(Bearer(a->key)).retry_after_seconds, 60);
  now += absl::Hours(1);
  ApiKeyDecision full = store->Admit(Bearer(a->key));
  ASSERT_EQ(full.outcome, Outcome::kOk);
  full.grant->Debit(600);
  EXPECT_EQ(store->Admit(Bearer(a->key)).outcome, Outcome::kOutOfTokens);
}

TEST(ApiKeysTest, ReloadSwapsKeysKeepsStateAndSurvivesABadFile) {
  test_support::TempDir dir("api_keys_test");
  ASSERT_FALSE(dir.path().empty());
  const std::string path = dir.path() + "/keys.json";
  absl::StatusOr<MadeApiKey> a = MakeApiKey("a", {1, 0});
  absl::StatusOr<MadeApiKey> b = MakeApiKey("b", {});
  absl::StatusOr<MadeApiKey> a2 = MakeApiKey("a2", {});
  ASSERT_TRUE(a.ok() && b.ok() && a2.ok());
  WriteFile(path, KeysFile({a->entry}));
  int reloads_ok = 0, reloads_bad = 0;
  ApiKeyStoreOptions o;
  o.path = path;
  o.reload = absl::ZeroDuration();  // ReloadIfChanged by hand
  o.on_reload = [&](bool ok, size_t, const absl::Status&) { ++(ok ? reloads_ok : reloads_bad); };
  absl::StatusOr<std::unique_ptr<ApiKeyStore>> store = ApiKeyStore::Open(o);
  ASSERT_TRUE(store.ok()) << store.status();
  ApiKeyDecision held = (*store)->Admit(Bearer(a->key));
  ASSERT_EQ(held.outcome, Outcome::kOk);

  EXPECT_TRUE((*store)->ReloadIfChanged().ok());  // unchanged: nothing happens
  EXPECT_EQ(reloads_ok + reloads_bad, 0);

  // a's limit state is kept across a reload that keeps a: still one in flight.
  WriteFile(path, KeysFile({a->entry, b->entry}));
  ASSERT_TRUE((*store)->ReloadIfChanged().ok());
  EXPECT_EQ(reloads_ok, 1);
  EXPECT_EQ((*store)->Authenticate(Bearer(b->key)).outcome, Outcome::kOk);
  EXPECT_EQ((*store)->Admit(Bearer(a->key)).outcome, Outcome::kTooManyRequests);

  // A bad file: refused, the keys stay, reported once.
  WriteFile(path, "{\"keys\": [");
  const absl::Status bad = (*store)->ReloadIfChanged();
  EXPECT_NE(bad.message().find("invalid JSON"), std::string::npos) << bad;
  EXPECT_TRUE((*store)->ReloadIfChanged().ok());  // the same bad file: not re-read
  EXPECT_EQ(reloads_bad, 1);
  EXPECT_EQ((*store)->Authenticate(Bearer(b->key)).outcome, Outcome::kOk);
  EXPECT_EQ((*store)->size(), 2u);
  // An oversized one: read no further than the limit, the same.
  WriteFile(path, std::string(kMaxApiKeysFileBytes + 1, ' '));
  const absl::Status big = (*store)->ReloadIfChanged();
  EXPECT_NE(big.message().find("over the limit of 1048576 bytes"), std::string::npos) << big;
  EXPECT_EQ(reloads_bad, 2);
  EXPECT_EQ((*store)->Authenticate(Bearer(b->key)).outcome, Outcome::kOk);
  // A missing file: the same, reported once.
  std::filesystem::remove(path);
  EXPECT_FALSE((*store)->ReloadIfChanged().ok());
  EXPECT_FALSE((*store)->ReloadIfChanged().ok());
  EXPECT_EQ(reloads_bad, 3);
  EXPECT_EQ((*store)->Authenticate(Bearer(b->key)).outcome, Outcome::kOk);

  // a revoked, a2 added.
  WriteFile(path, KeysFile({b->entry, a2->entry}));
  ASSERT_TRUE((*store)->ReloadIfChanged().ok());
  EXPECT_EQ((*store)->Authenticate(Bearer(a->key)).outcome, Outcome::kInvalid);
  EXPECT_EQ((*store)->Authenticate(Bearer(a2->key)).outcome, Outcome::kOk);
  held.grant.reset();  // a request of a revoked key ends without harm
}

TEST(ApiKeysTest, OpenFailsNamingTheFileAndTheProblem) {
  test_support::TempDir dir("api_keys_test");
  ApiKeyStoreOptions o;
  o.path = dir.path() + "/missing.json";
  absl::StatusOr<std::unique_ptr<ApiKeyStore>> s = ApiKeyStore::Open(o);
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.status().message().find("missing.json: cannot stat"), std::string::npos)
      << s.status();
  o.path = dir.path() + "/big.json";
  WriteFile(o.path, std::string(kMaxApiKeysFileBytes + 1, ' '));
  s = ApiKeyStore::Open(o);
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.status().message().find("1048577 bytes, over the limit of 1048576"),
            std::string::npos)
      << s.status();
}

TEST(ApiKeysTest, MetricsLabelsAreBounded) {
  std::vector<std::string> entries;
  std::vector<std::string> keys;
  for (int i = 0; i < 70; ++i) {
    absl::StatusOr<MadeApiKey> k = MakeApiKey(absl::StrCat("id", i), {});
    ASSERT_TRUE(k.ok());
    entries.push_back(k->entry);
    keys.push_back(k->key);
  }
  auto store = StoreOf(entries);
  std::set<std::string> labels;
  for (const std::string& k : keys) {
    const ApiKeyDecision d = store->Admit(Bearer(k));
    ASSERT_EQ(d.outcome, Outcome::kOk);
    labels.insert(d.metric_label);
  }
  EXPECT_EQ(labels.size(), kMaxApiKeyMetricLabels + 1);
  EXPECT_EQ(labels.count("other"), 1u);
}

}  // namespace
}  // namespace kvr::gateway
