# services/infra/placement: hashing test vectors, rendezvous balance and movement,
# grouping, chunking, node-list parsing.
kvr_test(placement_test SOURCES unit/placement_test.cc DEPS kvr::placement)
