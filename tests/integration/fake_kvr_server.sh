#!/bin/bash
# A stand-in for kvr_node / kvr_worker / kvr_gateway, named by the copy that
# runs it, for tests of what `kvr cluster` passes its children
# (cluster_secure_test): prints "argv: <its arguments>", then the lines a
# real server prints for the addresses it was given (--listen,
# --metrics_listen, --http_listen), and idles until SIGTERM (exit 0).
# `--helpfull` lists the TLS / API key flags, unless a file `no_tls_flags`
# lies beside the copy (a binary built without them).
prog=$(basename "$0")
if [ "$1" = "--helpfull" ]; then
  if [ ! -e "$(dirname "$0")/no_tls_flags" ]; then
    for f in tls_cert_file tls_key_file tls_ca_file tls_allowed_peers public_tls_cert_file \
             public_tls_key_file api_keys_file; do
      echo "    --$f (fake flag); default: \"\";"
    done
  fi
  exit 0
fi
echo "argv: $*"
listen="" metrics="" http=""
for a in "$@"; do
  case "$a" in
    --listen=*) listen=${a#*=} ;;
    --metrics_listen=*) metrics=${a#*=} ;;
    --http_listen=*) http=${a#*=} ;;
  esac
done
idle=""
trap '[ -n "$idle" ] && kill "$idle" 2>/dev/null; exit 0' TERM INT
echo "$prog metrics on $metrics"
if [ -n "$http" ]; then echo "$prog http on $http"; fi
echo "$prog listening on $listen"
# Short sleeps: one orphaned when this shell is SIGKILLed ends within 1 s.
while :; do
  sleep 1 &
  idle=$!
  wait "$idle"
done
