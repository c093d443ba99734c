"""kdpipe: offline knowledge distillation (capture -> compressed shards -> student training)."""
