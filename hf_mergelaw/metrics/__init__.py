"""``evaluate`` metric modules shipped with hf-mergelaw (see ``hf_mergelaw.metric_path()``)."""
