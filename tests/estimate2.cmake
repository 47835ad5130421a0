# Issue 18, session 26: summaries clustered off the Attend path, and the
# refined (two-level) estimate.
kvr_test(node_estimate2_test SOURCES unit/node_estimate2_test.cc
  DEPS kvr::node_core LABELS unit TIMEOUT 120)

# The second-order estimator against a double-precision oracle (Gaussian
# clusters, single-key clusters, no double counting, appends == rebuild).
kvr_test(estimate2_test SOURCES unit/estimate2_test.cc
  DEPS kvr::index LABELS unit TIMEOUT 120)
