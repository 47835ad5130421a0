# Helpers that keep every target's settings target-scoped.
#
#   kvr_library(NAME SOURCES ... [PUBLIC_DEPS ...] [PRIVATE_DEPS ...])
#     builds static library kvr_NAME with alias kvr::NAME.
#   kvr_test(NAME {SOURCES ... [DEPS ...] [ARGS ...] [OWN_MAIN | NODE_MAIN] | COMMAND ...}
#            [NEEDS target ...] [LABELS ...] [TIMEOUT s] [ENVIRONMENT VAR=value ...]
#            [WORKING_DIRECTORY dir] [PROPERTIES name value ...] [PROTOBUF_FIRST])
#     registers every ctest test: a GoogleTest executable NAME built from
#     SOURCES (linked with DEPS, kvr::testing, gtest and, unless OWN_MAIN,
#     gtest_main; NODE_MAIN: tests/support/node_test_main.cc's main instead,
#     which reads --kvr_node PATH; ARGS passed to it), or a COMMAND; NEEDS are targets
#     (servers, plugins) built first. Labels default to unit, the timeout to
#     300 s; every test gets KVR_TEST_ENVIRONMENT (where the models are);
#     PROPERTIES are more test properties (fixtures). Arguments pass through
#     a CMake list: write a ';' inside a COMMAND argument as $<SEMICOLON>.
#     PROTOBUF_FIRST: see kvr_link_protobuf_first.
#   kvr_link_protobuf_first(TARGET)
#     puts libprotobuf first on an executable's link line (call it before any
#     other target_link_libraries of TARGET).

# Every test's environment: where the bundled model and the optional extra
# models are (tests/support/models.h).
set(KVR_TEST_ENVIRONMENT "KVR_MODELS=${KVR_MODELS_DIR}" "KVR_SHARED_MODELS=${KVR_SHARED_MODELS_DIR}")

set(KVR_WARNINGS -Wall -Wextra -Wshadow -Wsign-compare -Wno-unused-parameter)
if(KVR_WERROR)
  list(APPEND KVR_WARNINGS -Werror)
endif()

# Per-target include directories. Includes are written from the repository
# root ("retrieval_node/core/node_core.h"), but a library does not export the
# root: it exports a folder of its own under the build tree that holds links
# to the headers beside its sources only, at their root-relative paths. A
# target therefore compiles against its own headers and those of the
# libraries it links, and an #include of anything else fails to compile
# (tests/layering checks the finer folder rules of the READMEs).
function(kvr_stage_headers target)
  set(_stage ${PROJECT_BINARY_DIR}/include/${target})
  set(_dirs)
  get_target_property(_sources ${target} SOURCES)
  foreach(_src IN LISTS _sources)
    get_filename_component(_abs ${_src} ABSOLUTE BASE_DIR ${CMAKE_CURRENT_SOURCE_DIR})
    get_filename_component(_dir ${_abs} DIRECTORY)
    list(APPEND _dirs ${_dir})
  endforeach()
  list(REMOVE_DUPLICATES _dirs)
  foreach(_dir IN LISTS _dirs)
    file(GLOB _headers CONFIGURE_DEPENDS ${_dir}/*.h ${_dir}/*.cuh ${_dir}/*.cu)
    foreach(_h IN LISTS _headers)
      file(RELATIVE_PATH _rel ${PROJECT_SOURCE_DIR} ${_h})
      get_filename_component(_rel_dir ${_stage}/${_rel} DIRECTORY)
      file(MAKE_DIRECTORY ${_rel_dir})
      if(NOT EXISTS ${_stage}/${_rel})
        file(CREATE_LINK ${_h} ${_stage}/${_rel} SYMBOLIC)
      endif()
    endforeach()
  endforeach()
  target_include_directories(${target} PUBLIC ${_stage})
endfunction()

function(kvr_library name)
  cmake_parse_arguments(ARG "" "" "SOURCES;PUBLIC_DEPS;PRIVATE_DEPS" ${ARGN})
  add_library(kvr_${name} STATIC ${ARG_SOURCES})
  add_library(kvr::${name} ALIAS kvr_${name})
  kvr_stage_headers(kvr_${name})
  target_compile_options(kvr_${name} PRIVATE $<$<COMPILE_LANGUAGE:CXX>:${KVR_WARNINGS}>)
  target_link_libraries(kvr_${name} PUBLIC ${ARG_PUBLIC_DEPS} PRIVATE ${ARG_PRIVATE_DEPS})
endfunction()

# libprotobuf first: libsentencepiece (via kvr::model) bundles protobuf-lite
# symbols that must not interpose on libprotobuf's (a static-initialization
# crash otherwise). An executable that links both gets libprotobuf first on
# its link line, and its main() references libprotobuf
# (GOOGLE_PROTOBUF_VERIFY_VERSION) so that --as-needed records it in
# DT_NEEDED before libsentencepiece. Every executable linking generated code
# does the same, so the order never depends on which libraries pull in what.
# libsentencepiece comes second, before abseil's flags libraries: it also
# bundles a small absl flags copy whose FLAGS_help / FLAGS_version /
# FLAGS_minloglevel (32-byte Flag<bool> objects, reached through its GOT)
# would otherwise bind to libabsl_flags_usage_internal's 1-byte dummy
# `bool FLAGS_help` etc., and its static initializers would overwrite the
# .bss after them, which holds the Mutex absl::ParseCommandLine locks (the
# "Mutex corrupt" abort of kvr_worker under TSan; docs/security.md
# "Sanitizers"). Bound to libsentencepiece's own objects, nothing is
# overwritten: abseil never references its dummies.
function(kvr_link_protobuf_first target)
  target_link_libraries(${target} PRIVATE protobuf::libprotobuf)
  # A path, not PkgConfig::SentencePiece: CMake would move the target after
  # kvr::model, which depends on it, i.e. after abseil's flags libraries.
  find_library(KVR_SENTENCEPIECE_LIBRARY sentencepiece)
  if(KVR_SENTENCEPIECE_LIBRARY)
    target_link_libraries(${target} PRIVATE ${KVR_SENTENCEPIECE_LIBRARY})
  endif()
endfunction()

function(kvr_test name)
  cmake_parse_arguments(ARG "PROTOBUF_FIRST;OWN_MAIN;NODE_MAIN" "TIMEOUT;WORKING_DIRECTORY"
    "SOURCES;DEPS;ARGS;COMMAND;NEEDS;LABELS;ENVIRONMENT;PROPERTIES" ${ARGN})
  if(ARG_SOURCES AND ARG_COMMAND)
    message(FATAL_ERROR "kvr_test(${name}): SOURCES (a GoogleTest program) or COMMAND, not both")
  endif()
  set(_workdir)
  if(ARG_WORKING_DIRECTORY)
    set(_workdir WORKING_DIRECTORY ${ARG_WORKING_DIRECTORY})
  endif()
  if(ARG_SOURCES)
    set(_sources ${ARG_SOURCES})
    if(ARG_NODE_MAIN)
      list(APPEND _sources ${PROJECT_SOURCE_DIR}/tests/support/node_test_main.cc)
    endif()
    add_executable(${name} ${_sources})
    target_compile_options(${name} PRIVATE ${KVR_WARNINGS})
    if(ARG_PROTOBUF_FIRST)
      kvr_link_protobuf_first(${name})
    endif()
    set(_main GTest::gtest_main)
    if(ARG_OWN_MAIN OR ARG_NODE_MAIN)
      set(_main)  # the test's own main() (to parse its flags), or node_test_main.cc
    endif()
    target_link_libraries(${name} PRIVATE ${ARG_DEPS} kvr::testing GTest::gtest ${_main})
    add_test(NAME ${name} COMMAND ${name} ${ARG_ARGS} ${_workdir})
  elseif(ARG_COMMAND)
    add_test(NAME ${name} COMMAND ${ARG_COMMAND} ${_workdir})
  else()
    message(FATAL_ERROR "kvr_test(${name}): needs SOURCES or COMMAND")
  endif()
  if(ARG_NEEDS)
    if(NOT ARG_SOURCES)
      # A command test has no target of its own to hang the build order on.
      add_custom_target(${name}_needs ALL DEPENDS ${ARG_NEEDS})
    else()
      add_dependencies(${name} ${ARG_NEEDS})
    endif()
  endif()
  if(NOT ARG_LABELS)
    set(ARG_LABELS unit)
  endif()
  if(NOT ARG_TIMEOUT)
    set(ARG_TIMEOUT 300)
  endif()
  set_tests_properties(${name} PROPERTIES LABELS "${ARG_LABELS}" TIMEOUT ${ARG_TIMEOUT}
    ENVIRONMENT "${KVR_TEST_ENVIRONMENT};${ARG_ENVIRONMENT}" ${ARG_PROPERTIES})
endfunction()
