"""The data chapter: data/prepare.py builds token shards; sample.py (repo root) reads them."""
