# services/infra/metrics (MetricSet, CodeCounters: exposition, scrape hook,
# per-code rows) and services/infra/server (FlagChecks messages).
kvr_test(server_infra_test SOURCES unit/server_infra_test.cc
  DEPS kvr::metric_set kvr::server_main TIMEOUT 60)
