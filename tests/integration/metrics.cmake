# retrieval_node/server metrics: a real kvr_node's /metrics scraped over
# loopback, counters checked against the calls made, text checked by
# `promtool check metrics` (Debian package prometheus; skipped without it).
kvr_test(metrics_test SOURCES integration/metrics_test.cc NODE_MAIN
  DEPS kvr::remote_clients
  ARGS --kvr_node $<TARGET_FILE:kvr_node> NEEDS kvr_node
  LABELS integration TIMEOUT 120)
