// services/infra/metrics MetricSet / CodeCounters and services/infra/server
// FlagChecks: the exposition a MetricSet serves (families, labels, buckets,
// the scrape hook), the per-code counter rows, and the exact flag messages
// the servers print.
#include <cmath>
#include <cstdint>
#include <limits>
#include <map>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "prometheus/metric_family.h"
#include "prometheus/text_serializer.h"
#include "services/infra/metrics/metric_set.h"
#include "services/infra/server/server_main.h"

namespace kvr {
namespace {

std::string Page(const metrics::MetricSet& set) {
  return prometheus::TextSerializer().Serialize(set.collectable()->Collect());
}

TEST(MetricSet, BuildsFamiliesAndRunsTheScrapeHookFirst) {
  metrics::MetricSet set;
  prometheus::Counter& c = set.Counter("kvr_test_things_total", "Things");
  prometheus::Gauge& g = set.Gauge("kvr_test_level", "Level");
  prometheus::Histogram& h =
      set.Histogram("kvr_test_wait_seconds", "Wait", metrics::MicrosToSecondsBuckets());
  c.Increment(3);
  h.Observe(0.003);
  int scrapes = 0;
  set.OnScrape([&] { g.Set(++scrapes * 10); });

  const std::string page = Page(set);
  EXPECT_EQ(scrapes, 1);
  EXPECT_NE(page.find("# HELP kvr_test_things_total Things\n"), std::string::npos) << page;
  EXPECT_NE(page.find("kvr_test_things_total 3\n"), std::string::npos) << page;
  EXPECT_NE(page.find("kvr_test_level 10\n"), std::string::npos) << page;
  EXPECT_NE(page.find("kvr_test_wait_seconds_bucket{le=\"0.0025\"} 0\n"), std::string::npos)
      << page;
  EXPECT_NE(page.find("kvr_test_wait_seconds_bucket{le=\"0.005\"} 1\n"), std::string::npos)
      << page;
  EXPECT_NE(page.find("kvr_test_wait_seconds_count 1\n"), std::string::npos) << page;
  EXPECT_NE(Page(set).find("kvr_test_level 20\n"), std::string::npos);
  EXPECT_EQ(scrapes, 2);
}

TEST(MetricSet, BucketSets) {
  const metrics::Buckets micros = metrics::MicrosToSecondsBuckets();
  ASSERT_EQ(micros.size(), 17u);
  EXPECT_EQ(micros.front(), 50e-6);
  EXPECT_EQ(micros.back(), 10.0);
  const metrics::Buckets pow2 = metrics::PowerOfTwoBuckets(32, double(1 << 21));
  ASSERT_EQ(pow2.size(), 17u);  // 2^5 .. 2^21
  for (size_t i = 0; i < pow2.size(); ++i) EXPECT_EQ(pow2[i], std::ldexp(1.0, int(i) + 5));
}

TEST(CodeCounters, OkRowsFromTheStartAndUnknownForForeignCodes) {
  metrics::MetricSet set;
  metrics::CodeCounters counters(set.CounterFamily("kvr_test_requests_total", "Requests"),
                                 {{{"method", "A"}}, {{"method", "B"}}});
  std::string page = Page(set);
  EXPECT_NE(page.find("kvr_test_requests_total{code=\"OK\",method=\"A\"} 0\n"),
            std::string::npos)
      << page;
  EXPECT_NE(page.find("kvr_test_requests_total{code=\"OK\",method=\"B\"} 0\n"),
            std::string::npos)
      << page;

  counters.Get(1, absl::StatusCode::kNotFound).Increment();
  counters.Get(1, absl::StatusCode::kNotFound).Increment();
  counters.Get(0, static_cast<absl::StatusCode>(99)).Increment();
  EXPECT_EQ(&counters.Get(1, absl::StatusCode::kNotFound),
            &counters.Get(1, absl::StatusCode::kNotFound));
  page = Page(set);
  EXPECT_NE(page.find("kvr_test_requests_total{code=\"NOT_FOUND\",method=\"B\"} 2\n"),
            std::string::npos)
      << page;
  EXPECT_NE(page.find("kvr_test_requests_total{code=\"UNKNOWN\",method=\"A\"} 1\n"),
            std::string::npos)
      << page;
  EXPECT_EQ(page.find("method=\"A\"} 2"), std::string::npos) << page;
}

TEST(CodeCounters, OneUnlabelledRow) {
  metrics::MetricSet set;
  metrics::CodeCounters counters(set.CounterFamily("kvr_test_calls_total", "Calls"),
                                 std::vector<prometheus::Labels>(1));
  counters.Get(0, absl::StatusCode::kCancelled).Increment(5);
  const std::string page = Page(set);
  EXPECT_NE(page.find("kvr_test_calls_total{code=\"OK\"} 0\n"), std::string::npos) << page;
  EXPECT_NE(page.find("kvr_test_calls_total{code=\"CANCELLED\"} 5\n"), std::string::npos)
      << page;
}

TEST(FlagChecks, MessagesAndFirstFailureWins) {
  EXPECT_TRUE(server::FlagChecks().InRange("threads", 0, 0, 256).AtLeast("x", 1, 1).ok());
  EXPECT_EQ(server::FlagChecks().InRange("threads", 257, 0, 256).status().message(),
            "--threads outside [0, 256]");
  EXPECT_EQ(server::FlagChecks().InRange("threads", -1, 0, 256).status().message(),
            "--threads outside [0, 256]");
  EXPECT_EQ(server::FlagChecks().AtLeast("max_message_bytes", 5, 1 << 16).status().message(),
            "--max_message_bytes must be >= 65536");
  EXPECT_EQ(server::FlagChecks().AtLeast("memory_budget_bytes", int64_t{-1}, int64_t{0})
                .status()
                .message(),
            "--memory_budget_bytes must be >= 0");
  EXPECT_EQ(server::FlagChecks().AtLeast("health_check_seconds", 0.0, 0.01).status().message(),
            "--health_check_seconds must be >= 0.01");
  EXPECT_EQ(server::FlagChecks().AtLeast("drain_seconds", -1.0, 0.0).status().message(),
            "--drain_seconds must be >= 0");
  EXPECT_EQ(server::FlagChecks().Above("request_timeout_seconds", 0.0, 0.0).status().message(),
            "--request_timeout_seconds must be > 0");
  const double nan = std::numeric_limits<double>::quiet_NaN();
  EXPECT_FALSE(server::FlagChecks().Above("x", nan, 0.0).ok());
  EXPECT_FALSE(server::FlagChecks().AtLeast("x", nan, 0.0).ok());
  EXPECT_FALSE(server::FlagChecks().InRange("x", nan, 0.0, 1.0).ok());

  const absl::Status first =
      server::FlagChecks().InRange("a", 5, 0, 1).AtLeast("b", 0, 1).status();
  EXPECT_TRUE(absl::IsInvalidArgument(first));
  EXPECT_EQ(first.message(), "--a outside [0, 1]");
}

}  // namespace
}  // namespace kvr
