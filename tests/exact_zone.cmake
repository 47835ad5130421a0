# Session 27, issue 18 item 3: the estimate's exact zone (ExactZoneOptions,
# kvr_node --exact_zone_keys_fraction) against a double-precision oracle:
# full cover = full attention, empty zone = the estimate bit for bit, no key
# counted twice, error non-increasing in the budget, hostile fractions, the
# node's keys_exact_zone.
kvr_test(exact_zone_test SOURCES unit/exact_zone_test.cc
  DEPS kvr::index kvr::node_core kvr::attention_data LABELS unit TIMEOUT 120)
