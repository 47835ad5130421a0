# Chaos (issue 15): `kvr cluster --workers 2 --replicas 2` under 8 greedy
# streams while nodes are killed (3 rounds) and a worker once; and two nodes
# killed together (every replica of some shards lost: the worker recomputes
# from token ids); 0 failed requests and every output identical to the
# fault-free run
# (tests/e2e/chaos_test.py, which drives the cluster with the helpers of
# bench/failover_bench.py). Needs the gateway's HTTP API.
if(TARGET kvr_gateway)
  find_package(Python3 REQUIRED COMPONENTS Interpreter)
  kvr_test(chaos_e2e_test
    COMMAND ${Python3_EXECUTABLE} ${CMAKE_CURRENT_SOURCE_DIR}/e2e/chaos_test.py
      --kvr $<TARGET_FILE:kvr>
    NEEDS kvr kvr_node kvr_worker kvr_gateway
    LABELS e2e TIMEOUT 240)
  # Both replicas of shards lost at once: the worker recomputes from token ids.
  kvr_test(chaos_lose_replicas_e2e_test
    COMMAND ${Python3_EXECUTABLE} ${CMAKE_CURRENT_SOURCE_DIR}/e2e/chaos_test.py
      --kvr $<TARGET_FILE:kvr> --scenario lose_replicas
    NEEDS kvr kvr_node kvr_worker kvr_gateway
    LABELS e2e TIMEOUT 180)
endif()
