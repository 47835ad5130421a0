# Deployment validation (label deploy): the Helm chart (helm/kvr), its
# Prometheus rules, the Grafana dashboards and the container images'
# runtime package lists, checked offline with real tools (see
# tests/deploy/README.md). Tools come from scripts/install-deps.sh: Go + sprig
# (Debian) for the chart renderer, node + the npm packages in
# tests/deploy/node_modules for the schemas, promtool/prometheus (Debian
# package prometheus), python3-yaml and python3-jsonschema.

# Debian's python3 (python3-yaml, python3-jsonschema), not whatever is first
# on PATH.
find_program(KVR_DEPLOY_PYTHON python3 PATHS /usr/bin NO_DEFAULT_PATH)
find_program(KVR_DEPLOY_GO go PATHS /usr/lib/go/bin /usr/bin)
find_program(KVR_DEPLOY_NODE NAMES node nodejs)
find_program(KVR_DEPLOY_PROMTOOL promtool)
find_program(KVR_DEPLOY_PROMETHEUS prometheus)

set(_missing)
foreach(tool KVR_DEPLOY_PYTHON KVR_DEPLOY_GO KVR_DEPLOY_NODE KVR_DEPLOY_PROMTOOL
        KVR_DEPLOY_PROMETHEUS)
  if(NOT ${tool})
    list(APPEND _missing ${tool})
  endif()
endforeach()
if(_missing)
  message(STATUS "deploy tests: not registered, missing ${_missing} (run scripts/install-deps.sh)")
  return()
endif()

set(_deploy_src ${CMAKE_CURRENT_SOURCE_DIR}/deploy)
set(_deploy_bin ${CMAKE_CURRENT_BINARY_DIR}/deploy)
set(_render ${_deploy_bin}/kvr_chart_render)
set(_checks ${KVR_DEPLOY_PYTHON} ${_deploy_src}/deploy_checks.py)

# The chart renderer, built offline in GOPATH mode from Debian's Go packages
# (sprig and its dependencies under /usr/share/gocode), with the build cache
# inside the build tree.
kvr_test(deploy_render_build
  COMMAND ${CMAKE_COMMAND} -E env GO111MODULE=off GOPATH=/usr/share/gocode
          GOCACHE=${_deploy_bin}/gocache GOFLAGS= GOTOOLCHAIN=local GOPROXY=off
          ${KVR_DEPLOY_GO} build -o ${_render} .
  WORKING_DIRECTORY ${_deploy_src}/render
  LABELS deploy TIMEOUT 120 PROPERTIES FIXTURES_SETUP deploy_render)

kvr_test(deploy_manifests
  COMMAND ${_checks} manifests --render ${_render} --work ${_deploy_bin}/manifests
  LABELS deploy TIMEOUT 120 PROPERTIES FIXTURES_REQUIRED deploy_render)
kvr_test(deploy_rules
  COMMAND ${_checks} rules --render ${_render} --work ${_deploy_bin}/rules
          --promtool ${KVR_DEPLOY_PROMTOOL}
  LABELS deploy TIMEOUT 120 PROPERTIES FIXTURES_REQUIRED deploy_render)

kvr_test(deploy_values_schema
  COMMAND ${_checks} values --work ${_deploy_bin}/values
  LABELS deploy TIMEOUT 60)
kvr_test(deploy_dashboards
  COMMAND ${_checks} dashboards --work ${_deploy_bin}/dashboards
  LABELS deploy TIMEOUT 60)

# The Dockerfile's runtime package lists cover every shared library the
# freshly built binaries load.
set(_gateway_bin)
if(TARGET kvr_gateway)
  set(_gateway_bin --binary gateway=$<TARGET_FILE:kvr_gateway>)
endif()
kvr_test(deploy_runtime_packages
  COMMAND ${KVR_DEPLOY_PYTHON} ${_deploy_src}/runtime_packages.py
          --dockerfile ${PROJECT_SOURCE_DIR}/deploy/Dockerfile
          --binary node=$<TARGET_FILE:kvr_node> --binary node=$<TARGET_FILE:kvr_health_probe>
          --binary worker-cpu=$<TARGET_FILE:kvr_worker> ${_gateway_bin}
  LABELS deploy TIMEOUT 60)

# Every flag the chart passes (args and exec probes, every value set) is one
# the freshly built binary defines; the flags of a feature a binary predates
# (issue 16's mTLS / API keys, by a marker flag) are listed, not failed.
set(_gateway_flags)
if(TARGET kvr_gateway)
  set(_gateway_flags --binary gateway=$<TARGET_FILE:kvr_gateway>)
endif()
kvr_test(deploy_chart_flags
  COMMAND ${_checks} flags --render ${_render} --work ${_deploy_bin}/flags
          --binary node=$<TARGET_FILE:kvr_node> --binary worker=$<TARGET_FILE:kvr_worker>
          --binary probe=$<TARGET_FILE:kvr_health_probe> ${_gateway_flags}
  LABELS deploy TIMEOUT 120 PROPERTIES FIXTURES_REQUIRED deploy_render)

# The chart's mTLS wiring against the real binaries: kvr_node, kvr_worker and
# kvr_gateway started with the rendered --tls_* arguments (a CA and role
# certificates made by the openssl command in the Secrets' layout); the
# rendered exec probes answer SERVING, probes without or with a foreign
# certificate are refused, a completion passes gateway -> worker -> node, a
# gateway with the node's identity is refused. Skipped (77) while kvr_node has
# no --tls_cert_file.
find_program(KVR_DEPLOY_OPENSSL openssl)
if(KVR_DEPLOY_OPENSSL AND TARGET kvr_gateway)
  kvr_test(deploy_tls_chain
    COMMAND ${KVR_DEPLOY_PYTHON} ${_deploy_src}/tls_chain_test.py --render ${_render}
            --node_binary $<TARGET_FILE:kvr_node> --worker_binary $<TARGET_FILE:kvr_worker>
            --gateway_binary $<TARGET_FILE:kvr_gateway>
            --health_probe $<TARGET_FILE:kvr_health_probe> --openssl ${KVR_DEPLOY_OPENSSL}
            --model_dir ${PROJECT_SOURCE_DIR}/models --work ${_deploy_bin}/tls_chain
    LABELS deploy TIMEOUT 180
    PROPERTIES FIXTURES_REQUIRED deploy_render SKIP_RETURN_CODE 77)
elseif(NOT KVR_DEPLOY_OPENSSL)
  message(STATUS "deploy_tls_chain: not registered, no openssl command")
endif()

# The chart's API-key Secret against the real gateway: an entry from
# `kvr apikey` in the values, the rendered keys file projected like kubelet's
# Secret volume, kvr_gateway with the rendered arguments: 401 without or with
# a wrong key, accepted with the key, and a rotated Secret (..data swapped)
# picked up without a restart. Skipped (77) while the gateway has no
# --api_keys_file.
if(TARGET kvr_gateway)
  kvr_test(deploy_api_keys
    COMMAND ${KVR_DEPLOY_PYTHON} ${_deploy_src}/api_keys_test.py --render ${_render}
            --kvr $<TARGET_FILE:kvr> --gateway_binary $<TARGET_FILE:kvr_gateway>
            --work ${_deploy_bin}/api_keys
    LABELS deploy TIMEOUT 120
    PROPERTIES FIXTURES_REQUIRED deploy_render SKIP_RETURN_CODE 77)
endif()

# Live: `kvr cluster` (3 nodes, worker, gateway) scraped by a real Prometheus
# with the ServiceMonitor's configuration; every dashboard query must return
# data and every alert expression must parse.
if(TARGET kvr_gateway)
  kvr_test(deploy_live
    COMMAND ${KVR_DEPLOY_PYTHON} ${_deploy_src}/live_test.py
            --render ${_render} --kvr $<TARGET_FILE:kvr>
            --node_binary $<TARGET_FILE:kvr_node> --worker_binary $<TARGET_FILE:kvr_worker>
            --gateway_binary $<TARGET_FILE:kvr_gateway>
            --health_probe $<TARGET_FILE:kvr_health_probe>
            --prometheus ${KVR_DEPLOY_PROMETHEUS} --work ${_deploy_bin}/live
    LABELS deploy TIMEOUT 180 PROPERTIES FIXTURES_REQUIRED deploy_render)
endif()
