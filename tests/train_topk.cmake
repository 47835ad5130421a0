# Training top-k at prefill speed (issue 17 item 5): the sampled, blocked
# training top-k and the multi-query dot kernel behind the exact scan.
kvr_test(train_topk_test SOURCES unit/train_topk_test.cc DEPS kvr::common LABELS unit TIMEOUT 120)
