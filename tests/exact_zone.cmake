# Session 27, issue 18 item 3: the estimate's exact zone (ExactZoneOptions,
# kvr_node --exact_zone_keys_fraction) against a double-precision oracle:
# full cover = full attention, empty zone = the estimate bit for bit, no key
# counted twice, error non-increasing in the budget, hostile fractions, the
# node's keys_exact_zone.
kvr_test(exact_zone_test SOURCES unit/exact_zone_test.cc
  DEPS kvr::index kvr::node_core kvr::attention_data LABELS unit TIMEOUT 120)

# Over gRPC against a real kvr_node: a full zone is full attention and
# AttendStats.keys_exact_zone crosses the wire; bad --exact_zone_* flags stop
# the node.
if(KVR_WITH_SERVICES)
  kvr_test(exact_zone_grpc_test SOURCES integration/exact_zone_grpc_test.cc NODE_MAIN
    DEPS kvr::remote_clients
    ARGS --kvr_node $<TARGET_FILE:kvr_node> NEEDS kvr_node
    LABELS integration TIMEOUT 120)
endif()

# kvr generate's --exact_zone reaches the in-process node: a zone over every
# cluster is full attention (greedy text identical to --mode full over 96
# tokens of an offloaded prompt), no zone is not (this prompt diverges), and
# a value outside [0, 1] exits 2 naming the flag.
if(TARGET kvr)
  kvr_test(kvr_generate_exact_zone
    COMMAND bash -c "p='Once upon a time, there was a little girl named Lily. She loved to play \
outside in the park with her friends. One day, she saw a big red ball under a tree.'$<SEMICOLON> \
full=$(\"$0\" generate --prompt \"$p\" --max_tokens 96 --mode full) \
&& all=$(\"$0\" generate --prompt \"$p\" --max_tokens 96 --exact_zone 1) \
&& none=$(\"$0\" generate --prompt \"$p\" --max_tokens 96 --exact_zone 0) \
&& [ \"$all\" = \"$full\" ] && [ \"$none\" != \"$full\" ] && [ \${#full} -gt \${#p} ] \
&& { \"$0\" generate --prompt x --exact_zone 1.5 2>&1 >/dev/null$<SEMICOLON> [ $? -eq 2 ]$<SEMICOLON> } \
&& \"$0\" generate --prompt x --exact_zone 1.5 2>&1 | grep -q -- '--exact_zone'"
      $<TARGET_FILE:kvr>
    LABELS unit TIMEOUT 120)
endif()
