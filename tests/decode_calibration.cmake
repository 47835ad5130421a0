# Calibration on decode queries (issue 17 items 4 and 6): the node
# recalibrates a head's chunk indexes on its ring of recent decode queries
# (NodeCoreOptions::recalibrate_every, kvr_node --recalibrate_every) and seals
# calibrate appended keys on it.
kvr_test(decode_calibration_test SOURCES unit/decode_calibration_test.cc
  DEPS kvr::node_core kvr::shard_store RocksDB::rocksdb kvr::attention_data
  LABELS unit TIMEOUT 600)
if(KVR_WITH_SERVICES)
  # kvr_node refuses --recalibrate_every outside [0, 2^30] at start-up,
  # naming the flag (exit status 2).
  kvr_test(decode_calibration_flag_test
    COMMAND bash -c "for v in -1 1073741825 x$<SEMICOLON> do out=$(\"$0\" --recalibrate_every=$v 2>&1)$<SEMICOLON> rc=$?$<SEMICOLON> [ $rc -ne 0 ] && [ $rc -ne 124 ] || { echo \"--recalibrate_every=$v: exit $rc\"$<SEMICOLON> exit 1$<SEMICOLON> }$<SEMICOLON> grep -q recalibrate_every <<<\"$out\" || { echo \"$out\"$<SEMICOLON> exit 1$<SEMICOLON> }$<SEMICOLON> done"
      $<TARGET_FILE:kvr_node>
    NEEDS kvr_node LABELS integration TIMEOUT 60)
endif()
