# Issue 17 item 5: TrainingTopK's approximate mode (the worker's --train_topk=approx):
# recall floors vs the exact lists on every attention data family, exact scores,
# determinism, exact mode unchanged, bounds on the options.
kvr_test(train_topk_approx_test SOURCES unit/train_topk_approx_test.cc
  DEPS kvr::common kvr::attention_data LABELS unit TIMEOUT 300)
