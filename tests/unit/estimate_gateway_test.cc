// Issue 18 at the HTTP gateway (services/gateway/openai.h): `kvr.estimate`
// becomes AttentionParams.estimate; a non-string is a 400 naming
// kvr.estimate; the worker's "attention.estimate: ..." message (a bad
// string value) comes back under the HTTP name.
#include <string>

#include "gtest/gtest.h"
#include "services/gateway/openai.h"

namespace kvr::gateway {
namespace {

using nlohmann::json;

TEST(EstimateGatewayTest, KvrEstimateMapsToAttentionParams) {
  for (const char* mode : {"default", "on", "off"}) {
    ParsedRequest out;
    const json body = {{"model", "m"}, {"prompt", "Once"}, {"kvr", {{"estimate", mode}, {"k", 16}}}};
    ASSERT_FALSE(ParseRequest(Route::kCompletions, body, &out).has_value()) << mode;
    ASSERT_TRUE(out.request.attention().has_estimate());
    EXPECT_EQ(out.request.attention().estimate(), mode);
    EXPECT_EQ(out.request.attention().top_k(), 16);
  }
  ParsedRequest absent;
  ASSERT_FALSE(
      ParseRequest(Route::kCompletions, json{{"model", "m"}, {"prompt", "Once"}}, &absent).has_value());
  EXPECT_FALSE(absent.request.attention().has_estimate());
}

TEST(EstimateGatewayTest, NonStringEstimateIs400NamingTheField) {
  for (const json& bad : {json(1), json(true), json::array({"on"}), json::object()}) {
    ParsedRequest out;
    const json body = {{"model", "m"}, {"prompt", "Once"}, {"kvr", {{"estimate", bad}}}};
    const auto err = ParseRequest(Route::kCompletions, body, &out);
    ASSERT_TRUE(err.has_value()) << bad.dump();
    EXPECT_EQ(err->http_status, 400);
    EXPECT_EQ(err->param, "kvr.estimate");
    EXPECT_NE(err->message.find("kvr.estimate: expected"), std::string::npos) << err->message;
  }
  EXPECT_EQ(RenameWorkerFields(Route::kCompletions,
                               "attention.estimate: \"x\" is not one of \"default\", \"on\", "
                               "\"off\""),
            "kvr.estimate: \"x\" is not one of \"default\", \"on\", \"off\"");
}

}  // namespace
}  // namespace kvr::gateway
