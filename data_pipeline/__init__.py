"""Data preparation for CRATE language models: fetching raw corpora and tokenizer assets."""
