// The gateway's request-body limits without a server (services/gateway/
// openai.h): ParseBody's nesting bound (measured before parsing, brackets
// inside strings and after escaped quotes not counted) and error messages
// that quote a rejected value by its shape, never by dumping it.
#include <string>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "services/gateway/openai.h"

namespace kvr::gateway {
namespace {

using nlohmann::json;

std::string Nested(int depth) { return std::string(depth, '[') + std::string(depth, ']'); }

TEST(GatewayJsonLimitsTest, DepthUpToTheLimitParsesDeeperIsRefused) {
  json out;
  EXPECT_EQ(ParseBody(Nested(kMaxJsonDepth), &out), std::nullopt);
  std::optional<ApiError> e = ParseBody(Nested(kMaxJsonDepth + 1), &out);
  ASSERT_TRUE(e.has_value());
  EXPECT_EQ(e->http_status, 400);
  EXPECT_EQ(e->message, "request body: JSON nested deeper than the limit of 64 levels");
  // 200,000 deep (issue 14's body): refused the same way, nothing built.
  e = ParseBody(absl::StrCat(R"({"n": )", Nested(200000), "}"), &out);
  ASSERT_TRUE(e.has_value());
  EXPECT_NE(e->message.find("limit of 64"), std::string::npos);
  // Objects count as well as arrays.
  std::string objects;
  for (int i = 0; i < kMaxJsonDepth + 1; ++i) objects += "{\"a\":";
  objects += "1" + std::string(kMaxJsonDepth + 1, '}');
  EXPECT_TRUE(ParseBody(objects, &out).has_value());
}

TEST(GatewayJsonLimitsTest, BracketsInStringsAreText) {
  json out;
  const std::string deep_text = std::string(1000, '[');
  ASSERT_EQ(ParseBody(json{{"prompt", deep_text}}.dump(), &out), std::nullopt);
  EXPECT_EQ(out["prompt"], deep_text);
  // An escaped quote does not end the string; an escaped backslash does not
  // escape the closing quote.
  ASSERT_EQ(ParseBody(R"({"a": "\"[[[[", "b": "\\", "c": [1]})", &out), std::nullopt);
  EXPECT_EQ(out["b"], "\\");
  // After an escaped backslash the string ends, so these brackets count.
  EXPECT_TRUE(ParseBody(absl::StrCat(R"({"b": "\\", "c": )", Nested(65), "}"), &out).has_value());
}

TEST(GatewayJsonLimitsTest, MalformedJsonNamesTheParserError) {
  json out;
  std::optional<ApiError> e = ParseBody(R"({"model": )", &out);
  ASSERT_TRUE(e.has_value());
  EXPECT_NE(e->message.find("request body: invalid JSON ("), std::string::npos) << e->message;
  // Unbalanced closing brackets are the parser's to refuse.
  EXPECT_TRUE(ParseBody("]]]]{}", &out).has_value());
}

TEST(GatewayJsonLimitsTest, RejectedValuesAreQuotedByShape) {
  ParsedRequest parsed;
  json body = {{"model", "m"}, {"prompt", "p"}, {"n", json::array({1, 2, 3})}};
  std::optional<ApiError> e = ParseRequest(Route::kCompletions, body, &parsed);
  ASSERT_TRUE(e.has_value());
  EXPECT_EQ(e->param, "n");
  EXPECT_EQ(e->message, "n: an array of 3 outside [1, 16] (--max_n)");
  body["n"] = 17;  // n > 1 is served since issue 19, up to --max_n (16)
  e = ParseRequest(Route::kCompletions, body, &parsed);
  ASSERT_TRUE(e.has_value());
  EXPECT_EQ(e->message, "n: 17 outside [1, 16] (--max_n)");
  // A long number is cut at 64 bytes.
  body.erase("n");
  body["top_k"] = json::parse("1.5" + std::string(200, '1'));
  e = ParseRequest(Route::kCompletions, body, &parsed);
  ASSERT_TRUE(e.has_value());
  EXPECT_LT(e->message.size(), 120u) << e->message;
  EXPECT_EQ(e->param, "top_k");
}

}  // namespace
}  // namespace kvr::gateway
