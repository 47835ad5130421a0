# services/infra/membership: static lists, DNS specs, refresh and change
# notification through an injected resolver.
kvr_test(membership_test SOURCES unit/membership_test.cc DEPS kvr::membership TIMEOUT 60)
