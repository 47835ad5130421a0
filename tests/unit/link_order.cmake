# Link order of an executable that links libsentencepiece (kvr::model) and
# parses flags with abseil: when libsentencepiece is loaded (--as-needed drops
# it from the release build; the sanitizer builds keep it), its bundled
# FLAGS_help must bind to its own object, not to abseil's 1-byte dummy
# (cmake/KvrTargets.cmake, kvr_link_protobuf_first). abseil's flags libraries come first in DEPS, as in
# kvr_worker (through kvr::server_main), so without the fix they would bind.
kvr_test(link_order_test SOURCES unit/link_order_test.cc OWN_MAIN PROTOBUF_FIRST
  DEPS absl::flags_parse absl::flags kvr::model ${CMAKE_DL_LIBS} LABELS unit TIMEOUT 30)
